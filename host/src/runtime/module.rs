//! Loading a component for one world: the checks that refuse a bad module
//! with a reason, and what a loaded module knows about itself.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::cache::CacheStatus;
use super::state::GuestContext;

/// The two worlds of `wit/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum World {
    Consumer,
    Producer,
}

impl World {
    /// The interface this world's components must export.
    pub fn export(self) -> &'static str {
        match self {
            World::Consumer => super::bindings::CONSUME_EXPORT,
            World::Producer => super::bindings::PRODUCE_EXPORT,
        }
    }

    fn other(self) -> World {
        match self {
            World::Consumer => World::Producer,
            World::Producer => World::Consumer,
        }
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            World::Consumer => "consumer",
            World::Producer => "producer",
        })
    }
}

impl std::str::FromStr for World {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "consumer" => Ok(World::Consumer),
            "producer" => Ok(World::Producer),
            other => Err(format!("unknown world {other:?}: expected consumer or producer")),
        }
    }
}

/// What to load: the bytes and what the deployment says about them.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    /// A short name for logs, e.g. the file stem (`consumer`).
    pub name: String,
    pub bytes: Vec<u8>,
    /// An optional human version (from config); the content hash is always known.
    pub version: Option<String>,
    /// Values the guest reads through the `config` import.
    pub config: BTreeMap<String, String>,
}

impl ModuleSpec {
    /// A spec with no version and no config.
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        ModuleSpec { name: name.into(), bytes, version: None, config: BTreeMap::new() }
    }

    /// Adds config values.
    pub fn with_config<K: Into<String>, V: Into<String>>(mut self, values: impl IntoIterator<Item = (K, V)>) -> Self {
        self.config.extend(values.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }
}

/// Identity and provenance of a loaded module.
#[derive(Debug)]
pub struct ModuleInfo {
    pub name: String,
    pub world: World,
    /// SHA-256 of the component bytes: the version that is always known.
    pub hash: [u8; 32],
    pub version: Option<String>,
    pub size: usize,
    /// Whether compilation was skipped thanks to the artifact cache.
    pub cache: CacheStatus,
    pub(super) guest: Arc<GuestContext>,
}

impl ModuleInfo {
    /// `name@version+hash` (or `name@hash`): how logs, metrics and health name it.
    pub fn label(&self) -> &str {
        &self.guest.label
    }
}

pub(super) fn label(name: &str, version: Option<&str>, hash: &[u8; 32]) -> String {
    let short = hex::encode(&hash[..6]);
    match version {
        Some(v) => format!("{name}@{v}+{short}"),
        None => format!("{name}@{short}"),
    }
}

/// SHA-256 of a module's bytes: its identity for the cache, labels and reloads.
pub fn content_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Why a module was refused. Always names the module.
#[derive(Debug, thiserror::Error)]
#[error("module {module}: {kind}")]
pub struct LoadError {
    pub module: String,
    pub kind: LoadErrorKind,
}

/// The reasons a module is refused, for callers that act on them.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrorKind {
    #[error("{size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("empty file")]
    Empty,
    #[error("not a WebAssembly binary (no \\0asm header)")]
    NotWasm,
    #[error(
        "a core WebAssembly module, not a component: build it with `cargo build --target wasm32-wasip2` or `cargo component build`"
    )]
    CoreModule,
    #[error("does not compile: {0}")]
    Compile(String),
    #[error("targets the {found} world (exports {export}), but a {expected} is needed here")]
    WrongWorld { expected: World, found: World, export: &'static str },
    #[error("does not export {missing}, which the {world} world requires (its exports: {exports})")]
    MissingExport { world: World, missing: &'static str, exports: String },
    #[error("cannot be linked: {0}")]
    Link(String),
}

/// Cheap header checks, before spending time compiling.
pub(super) fn check_header(bytes: &[u8], max_size: usize) -> Result<(), LoadErrorKind> {
    if bytes.is_empty() {
        return Err(LoadErrorKind::Empty);
    }
    if bytes.len() > max_size {
        return Err(LoadErrorKind::TooLarge { size: bytes.len(), limit: max_size });
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadErrorKind::NotWasm);
    }
    // Bytes 4..8: version 1 and layer 0 for a core module; layer 1 for a component.
    match &bytes[4..8] {
        [1, 0, 0, 0] => Err(LoadErrorKind::CoreModule),
        [_, _, 1, 0] => Ok(()),
        _ => Err(LoadErrorKind::NotWasm),
    }
}

/// Checks that the component exports what `world` needs.
pub(super) fn check_exports(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
    world: World,
) -> Result<(), LoadErrorKind> {
    // By name with semver matching: a guest built against `@0.1.0` exports
    // `consume@0.1.0`, which serves where `consume@0.1.1` is asked for.
    if component.get_export_index(None, world.export()).is_some() {
        return Ok(());
    }
    let other = world.other();
    if component.get_export_index(None, other.export()).is_some() {
        return Err(LoadErrorKind::WrongWorld { expected: world, found: other, export: other.export() });
    }
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let exports = if exports.is_empty() { "none".to_string() } else { exports.join(", ") };
    Err(LoadErrorKind::MissingExport { world, missing: world.export(), exports })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_told_apart() {
        let limit = 1 << 20;
        assert!(matches!(check_header(b"", limit), Err(LoadErrorKind::Empty)));
        assert!(matches!(check_header(b"hello world", limit), Err(LoadErrorKind::NotWasm)));
        assert!(matches!(check_header(b"\0asm\x01\0\0\0", limit), Err(LoadErrorKind::CoreModule)));
        assert!(check_header(b"\0asm\x0d\0\x01\0", limit).is_ok());
        assert!(matches!(check_header(&[0u8; 64], 32), Err(LoadErrorKind::TooLarge { size: 64, limit: 32 })));
    }

    #[test]
    fn labels_carry_version_and_hash() {
        let hash = content_hash(b"x");
        let short = hex::encode(&hash[..6]);
        assert_eq!(label("consumer", Some("1.2"), &hash), format!("consumer@1.2+{short}"));
        assert_eq!(label("consumer", None, &hash), format!("consumer@{short}"));
    }
}
