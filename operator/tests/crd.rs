//! The committed CRD, in `manifests/` and in the chart, is what the code generates.

#[test]
fn committed_crds_match_the_code() {
    let generated = sluice_operator::crd_yaml();
    for path in [
        "manifests/crd.yaml",
        "charts/sluice/crds/pipelineconfigs.yaml",
    ] {
        let committed =
            std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR")))
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            committed == generated,
            "{path} is out of date: run scripts/generate"
        );
    }
}
