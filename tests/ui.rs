//! The compile-time contract of `#[idempotent]`: what expands and runs (`ui/pass`), and what is
//! refused, with which message, at which tokens (`ui/fail`).
//!
//! The `.stderr` snapshots are tied to one toolchain (rustc 1.95); regenerate them with
//! `TRYBUILD=overwrite cargo test --test ui` and read every diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
    // With the `openapi` feature (scripts/test.sh runs this suite with every feature).
    if cfg!(feature = "openapi") {
        t.pass("tests/ui/openapi/*.rs");
    }
}
