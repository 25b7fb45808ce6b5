//! The dashboard's assets are built by Vite into `ui/dist` (scripts/ui, run by
//! scripts/setup) and compiled into the binary; without them the build stops here and says
//! how to make them.

fn main() {
    println!("cargo::rerun-if-changed=ui/dist");
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default();
    let index = std::path::Path::new(&manifest_dir).join("ui/dist/index.html");
    if !index.is_file() {
        panic!(
            "{} is missing: the dashboard is built with Node.js before sluice-ingest. \
             Run scripts/ui (or scripts/setup, which runs it), then build again.",
            index.display()
        );
    }
}
