//! Regenerates `src/miren_capnp.rs` from `capnp/miren.capnp` when `CAPNP_REGEN=1`.
//!
//! The generated file is committed so that an ordinary `cargo build` needs no
//! Cap'n Proto compiler; `.ci/run` regenerates it (when `capnp` is installed)
//! and fails if it drifted from the schema.
fn main() {
    println!("cargo:rerun-if-env-changed=CAPNP_REGEN");
    println!("cargo:rerun-if-changed=capnp/miren.capnp");
    if std::env::var("CAPNP_REGEN").as_deref() != Ok("1") {
        return;
    }
    if let Err(e) = capnpc::CompilerCommand::new()
        .src_prefix("capnp")
        .file("capnp/miren.capnp")
        .output_path("src")
        .run()
    {
        panic!("CAPNP_REGEN=1 but the schema could not be compiled (is Debian's `capnproto` installed?): {e}");
    }
}
