//! The Python drop-in (python/streaming_anomaly_service.py): its unittest suite runs
//! against this build's `fad` and a model trained from the bundled sample. Skipped, with a
//! note, only where there is no python3.

mod common;
use std::process::Command;

#[test]
fn python_module_tests_pass() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("note: python3 not found; python/test_streaming_anomaly_service.py was not run");
        return;
    }
    let out = Command::new("python3")
        .arg(common::repo().join("python/test_streaming_anomaly_service.py"))
        .env("FAD_BIN", env!("CARGO_BIN_EXE_fad"))
        .env("FAD_TEST_MODEL", common::model())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.status.success(), "the Python tests failed:\n{err}");
    assert!(err.contains("\nOK"), "{err}");
}
