//! `prism train`: runs `prism-node train` with the same arguments. The training is candle code in
//! the node crate; running the node binary keeps candle out of the CLI.

use std::ffi::OsString;
use std::process::Command;

use anyhow::Context;

pub fn run(args: &[OsString]) -> anyhow::Result<()> {
    let node = crate::local::sibling_or_path(&None, "prism-node");
    let status = Command::new(&node)
        .arg("train")
        .args(args)
        .status()
        .with_context(|| format!("running {} train (build it with `make build`)", node.display()))?;
    if !status.success() {
        // The node printed its error; keep its exit code for scripts.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
