//! Manifest parsing and validation (`prism validate`, `prism up`): multi-document YAML through the
//! offline OpenAPI + CEL checks and the cross-object rules. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prism_api::ManifestSet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut set = ManifestSet::default();
    if set.add_yaml(text).is_ok() {
        let _ = set.validate();
    }
});
