//! Prints the `PipelineConfig` CRD as YAML: scripts/generate writes it to
//! `manifests/crd.yaml` and `charts/sluice/crds/pipelineconfigs.yaml`.

fn main() {
    print!("{}", sluice_operator::crd_yaml());
}
