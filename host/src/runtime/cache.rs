//! Precompiled-component cache, so a restart skips compilation.
//!
//! An entry is keyed by the module's SHA-256 and the engine's compatibility
//! hash (wasmtime version, target, settings), and stores a checksum of the
//! artifact ahead of it. An entry that is truncated, corrupt or from another
//! engine is ignored, removed and rebuilt, never deserialized on trust.
//!
//! Deserializing an artifact runs native code it contains, so entries live
//! only in a directory that this user owns and nobody else may write. A
//! Kubernetes `emptyDir` with an `fsGroup` is owned by root, group-owned by
//! the fsGroup and mode 2777: the host may not chmod it, and others may
//! write to it. There the cache uses a subdirectory it creates for itself
//! (`wasm-pc-<uid>`, mode 0700). A cache that cannot be prepared never stops
//! the host: the caller warns and compiles without one.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 8] = b"WPCART01";
const HEADER: usize = MAGIC.len() + 32;

/// Whether a load was served from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Deserialized from a valid entry.
    Hit,
    /// Compiled, and an entry written (or no cache configured).
    Miss,
    /// An entry existed but was unusable; it was replaced.
    Rebuilt,
}

/// A directory of precompiled components.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
}

/// Why a cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot create {path}: {source}")]
    Create { path: String, source: std::io::Error },
    #[error("{path} is owned by uid {owner}, not by this user (uid {uid})")]
    NotOwned { path: String, owner: u32, uid: u32 },
    #[error("cannot restrict {path} to this user: {source}")]
    Permissions { path: String, source: std::io::Error },
    #[error("{path} is not a directory")]
    NotADirectory { path: String },
}

impl ArtifactCache {
    /// Opens the cache under `dir` for `engine`: `dir` itself when this user
    /// owns it (it is restricted to 0700), else a private subdirectory of it.
    pub fn open(dir: &Path, engine: &Engine) -> Result<Self, CacheError> {
        let dir = private_dir(dir)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ArtifactCache { dir, engine_key: format!("{:016x}", hasher.finish()) })
    }

    /// The directory entries are written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for a module with this hash lives.
    fn path_for(&self, module_hash: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}-{}.cwasm", hex::encode(module_hash), self.engine_key))
    }

    /// Loads a valid entry, if any. `Err` carries why an existing entry was
    /// refused (it has been removed).
    pub fn load(&self, engine: &Engine, module_hash: &[u8; 32]) -> Result<Option<Component>, String> {
        let path = self.path_for(module_hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("unreadable: {e}")),
        };
        let result = Self::verify(&bytes).and_then(|artifact| {
            // SAFETY: the artifact was written by this host into a directory only it
            // may write (0700), and its checksum matches, so it is the output of
            // `Component::serialize`; wasmtime checks its own header for engine
            // compatibility and refuses a mismatch with an error.
            unsafe { Component::deserialize(engine, artifact) }.map_err(|e| format!("refused by wasmtime: {e}"))
        });
        match result {
            Ok(component) => Ok(Some(component)),
            Err(reason) => {
                let _ = fs::remove_file(&path);
                Err(reason)
            }
        }
    }

    fn verify(bytes: &[u8]) -> Result<&[u8], String> {
        if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a wasm-pc cache entry (bad header or truncated)".into());
        }
        let (sum, artifact) = bytes[MAGIC.len()..].split_at(32);
        if Sha256::digest(artifact).as_slice() != sum {
            return Err("checksum mismatch (truncated or corrupt)".into());
        }
        Ok(artifact)
    }

    /// Stores a compiled component; written to a temporary file and renamed,
    /// so a crash never leaves a half-written entry under the real name.
    pub fn store(&self, module_hash: &[u8; 32], component: &Component) -> anyhow::Result<()> {
        let artifact = component.serialize()?;
        let path = self.path_for(module_hash);
        let mut tmp = tempfile_in(&self.dir)?;
        tmp.1.write_all(MAGIC)?;
        tmp.1.write_all(&Sha256::digest(&artifact))?;
        tmp.1.write_all(&artifact)?;
        tmp.1.sync_all()?;
        fs::rename(&tmp.0, &path)?;
        Ok(())
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, fs::File)> {
    let path = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let file = fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    Ok((path, file))
}

/// A directory under `dir` that only this user can write: `dir` itself if we
/// own it, else `dir/wasm-pc-<uid>`.
#[cfg(unix)]
fn private_dir(dir: &Path) -> Result<PathBuf, CacheError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let shown = |p: &Path| p.display().to_string();
    let create = |p: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .map_err(|source| CacheError::Create { path: shown(p), source })
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    create(dir)?;
    let meta = fs::metadata(dir).map_err(|source| CacheError::Create { path: shown(dir), source })?;
    let chosen = if meta.uid() == uid { dir.to_path_buf() } else { dir.join(format!("wasm-pc-{uid}")) };
    create(&chosen)?;
    // symlink_metadata: a link planted in a shared directory is refused, not followed.
    let meta = fs::symlink_metadata(&chosen).map_err(|source| CacheError::Create { path: shown(&chosen), source })?;
    if !meta.is_dir() {
        return Err(CacheError::NotADirectory { path: shown(&chosen) });
    }
    if meta.uid() != uid {
        return Err(CacheError::NotOwned { path: shown(&chosen), owner: meta.uid(), uid });
    }
    if meta.mode() & 0o077 != 0 {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&chosen, fs::Permissions::from_mode(0o700))
            .map_err(|source| CacheError::Permissions { path: shown(&chosen), source })?;
    }
    Ok(chosen)
}

#[cfg(not(unix))]
fn private_dir(dir: &Path) -> Result<PathBuf, CacheError> {
    fs::create_dir_all(dir).map_err(|source| CacheError::Create { path: dir.display().to_string(), source })?;
    Ok(dir.to_path_buf())
}
