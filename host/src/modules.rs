//! Where modules come from: a directory (a ConfigMap mount in Kubernetes)
//! holding `producer.wasm` and `consumer.wasm`, plus the config and version
//! the deployment gives each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::runtime::{ModuleSpec, World};

/// One role's module: which file, and what the guest is told.
#[derive(Debug, Clone)]
pub struct ModuleSource {
    pub world: World,
    pub path: PathBuf,
    pub version: Option<String>,
    pub config: BTreeMap<String, String>,
}

impl ModuleSource {
    /// `dir/<file>` for `world`, with no config.
    pub fn in_dir(dir: &Path, file: &str, world: World) -> Self {
        ModuleSource { world, path: dir.join(file), version: None, config: BTreeMap::new() }
    }

    /// A module file anywhere, with no config.
    pub fn file(path: PathBuf, world: World) -> Self {
        ModuleSource { world, path, version: None, config: BTreeMap::new() }
    }

    /// Reads the file into a spec named after its stem. A `<stem>.version`
    /// file beside it (a ConfigMap key, say) names the version, over the
    /// configured one, so a swapped module reports its own version.
    pub fn read(&self) -> std::io::Result<ModuleSpec> {
        Ok(self.spec(std::fs::read(&self.path)?))
    }

    /// The spec for `bytes` already read from this source's path, so a caller
    /// that hashed them loads exactly what it hashed.
    pub fn spec(&self, bytes: Vec<u8>) -> ModuleSpec {
        let name =
            self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| self.world.to_string());
        let version = std::fs::read_to_string(self.path.with_extension("version"))
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty() && v.len() <= 64)
            .or_else(|| self.version.clone());
        ModuleSpec { name, bytes, version, config: self.config.clone() }
    }
}

/// Parses `key=value` settings (flags or a comma-separated env value).
pub fn parse_pairs<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for item in items.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| format!("{item:?} is not key=value"))?;
        if k.trim().is_empty() {
            return Err(format!("{item:?} has an empty key"));
        }
        map.insert(k.trim().to_string(), v.to_string());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_file_beside_the_module_names_its_version() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("consumer.wasm"), b"\0asm")?;
        let mut source = ModuleSource::in_dir(dir.path(), "consumer.wasm", World::Consumer);
        source.version = Some("from-flag".into());
        assert_eq!(source.read()?.version.as_deref(), Some("from-flag"));
        std::fs::write(dir.path().join("consumer.version"), "1.4.2\n")?;
        let spec = source.read()?;
        assert_eq!((spec.name.as_str(), spec.version.as_deref()), ("consumer", Some("1.4.2")));
        Ok(())
    }

    #[test]
    fn pairs_parse_and_bad_ones_are_named() {
        let got = parse_pairs(["a=1", " b = x=y ", ""]).unwrap_or_default();
        assert_eq!(got.get("a").map(String::as_str), Some("1"));
        assert_eq!(got.get("b").map(String::as_str), Some(" x=y"));
        assert_eq!(parse_pairs(["novalue"]).err(), Some("\"novalue\" is not key=value".to_string()));
        assert!(parse_pairs(["=v"]).is_err());
    }
}
