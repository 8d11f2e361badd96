//! Reading policy files from a file or a directory.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy path {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy path {path} holds no .yaml or .yml file")]
    Empty { path: PathBuf },
}

/// Reads a policy file, or every `.yaml`/`.yml` file of a directory in name
/// order: (path, text) pairs.
pub fn read_policy_path(path: &Path) -> Result<Vec<(PathBuf, String)>, PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mut files = Vec::new();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io)? {
            let p = entry.map_err(io)?.path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(PolicyError::Empty {
                path: path.to_owned(),
            });
        }
    } else {
        files.push(path.to_owned());
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(|source| PolicyError::Io {
                path: p.clone(),
                source,
            })?;
            Ok((p, text))
        })
        .collect()
}
