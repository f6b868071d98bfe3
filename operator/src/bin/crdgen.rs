//! Writes Prism's CRDs to `crds/` (or prints them with `--stdout`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Generate Prism's CustomResourceDefinitions from the Rust types in prism-api")]
struct Args {
    /// Folder to write `<plural>.<group>.yaml` files into.
    #[arg(long, default_value = "crds")]
    out: PathBuf,
    /// Print all CRDs as one multi-document YAML stream instead of writing files.
    #[arg(long)]
    stdout: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let crds = prism_operator::crds::all();
    if args.stdout {
        for (_, crd) in &crds {
            print!("---\n{}", prism_operator::crds::render(crd)?);
        }
        return Ok(());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for (file, crd) in &crds {
        let path = args.out.join(file);
        std::fs::write(&path, prism_operator::crds::render(crd)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
