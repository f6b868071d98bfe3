//! `crds/` and `charts/prism/crds/` are generated; this fails when someone changed api/ without
//! running `make crds`.

use std::path::Path;

#[test]
fn committed_crds_match_the_generated_ones() {
    // The Helm chart carries its own copy (charts/ are packaged alone): both must be current.
    for folder in ["crds", "charts/prism/crds"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(folder);
        for (file, crd) in prism_operator::crds::all() {
            let want = prism_operator::crds::render(&crd).unwrap();
            let have = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("{folder}/{file} is missing ({e}); run `make crds`"));
            assert!(have == want, "{folder}/{file} is stale: run `make crds` and commit the result");
        }
    }
}
