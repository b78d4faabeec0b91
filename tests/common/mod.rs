//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A file or directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A photo under `samples`.
pub fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(name)
}

/// A path as a command-line argument.
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `segattn ARGS --weights WEIGHTS --size SIZE`, with any model the
/// environment names (SEGATTN_WEIGHTS, SEGATTN_MODEL) cleared.
pub fn segattn_with(args: &[&str], weights: &Path, size: usize) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segattn"));
    cmd.args(args).arg("--weights").arg(weights).args(["--size", &size.to_string()]);
    cmd.env_remove("SEGATTN_WEIGHTS").env_remove("SEGATTN_MODEL");
    cmd
}
