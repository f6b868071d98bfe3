//! `crds/` is generated; this fails when someone changed api/ without running `make crds`.

use std::path::Path;

#[test]
fn committed_crds_match_the_generated_ones() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (file, crd) in prism_operator::crds::all() {
        let want = prism_operator::crds::render(&crd).unwrap();
        let have = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("crds/{file} is missing ({e}); run `make crds`"));
        assert!(have == want, "crds/{file} is stale: run `make crds` and commit the result");
    }
}
