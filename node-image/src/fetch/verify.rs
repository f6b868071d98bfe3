//! Checking the result: what a fetched (or mounted) model folder must hold before a server
//! starts on it.

use super::*;

/// Checks that `dir` holds what the server loads: `config.json` (a JSON object), a
/// `model.safetensors` with a valid header, the files `arch` needs, readable JSON side files and
/// no half of a LoRA pair. Cheap: reads headers and small files only.
pub fn verify_folder(dir: &Path, arch: Option<&Architecture>) -> Result<(), FetchError> {
    let bad = |message: String| FetchError::Incomplete { dir: dir.to_path_buf(), message };
    let config = read_json(dir, "config.json")?.ok_or_else(|| bad("config.json is missing".into()))?;
    if !config.is_object() {
        return Err(bad("config.json is not a JSON object".into()));
    }
    check_safetensors(&dir.join("model.safetensors")).map_err(|m| bad(format!("model.safetensors: {m}")))?;
    for f in ["tokenizer.json", "preprocessor_config.json", "adapter_config.json"] {
        read_json(dir, f)?;
    }
    if let Some(a) = arch {
        for f in a.needs {
            if !dir.join(f).is_file() {
                return Err(bad(format!("{f} is missing and --architecture {} needs it", a.name)));
            }
        }
    }
    let adapter = dir.join("adapter_model.safetensors");
    if adapter.is_file() {
        if !dir.join("adapter_config.json").is_file() {
            return Err(bad("adapter_model.safetensors without adapter_config.json".into()));
        }
        check_safetensors(&adapter).map_err(|m| bad(format!("adapter_model.safetensors: {m}")))?;
    }
    let head = dir.join("projection.safetensors");
    if head.is_file() {
        check_safetensors(&head).map_err(|m| bad(format!("projection.safetensors: {m}")))?;
    }
    Ok(())
}

/// `Ok(None)` when the file does not exist; an error when it exists and is not JSON.
pub(super) fn read_json(dir: &Path, name: &str) -> Result<Option<serde_json::Value>, FetchError> {
    let p = dir.join(name);
    let bad = |message: String| FetchError::Incomplete { dir: dir.to_path_buf(), message };
    match std::fs::metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FetchError::io(&p, e)),
        Ok(m) if m.len() > MAX_JSON_FILE_BYTES => {
            return Err(bad(format!("{name} is {} (larger than any config)", human_bytes(m.len()))))
        }
        Ok(_) => {}
    }
    let bytes = std::fs::read(&p).map_err(|e| FetchError::io(&p, e))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| bad(format!("{name} is not JSON ({e})")))
}

/// safetensors: 8-byte little-endian header length, then that many bytes of JSON object.
pub(super) fn check_safetensors(p: &Path) -> Result<(), String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(p).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| format!("{len} bytes is too short for a safetensors file"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len == 0 || header_len > 100 << 20 || header_len + 8 > len {
        return Err(format!(
            "not a safetensors file (header length {header_len} in a {len}-byte file; an HTML error page?)"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    match serde_json::from_slice::<serde_json::Value>(&header) {
        Ok(v) if v.is_object() => Ok(()),
        _ => Err("not a safetensors file (its header is not a JSON object)".into()),
    }
}
