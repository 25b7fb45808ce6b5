//! Prints the `PipelineConfig` CRD as YAML: `cargo run --bin crdgen > manifests/crd.yaml`.

fn main() {
    print!("{}", sluice_operator::crd_yaml());
}
