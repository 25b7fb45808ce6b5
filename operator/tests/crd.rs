//! The committed CRD is what the code generates.

#[test]
fn committed_crd_matches_the_code() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/crd.yaml"
    ))
    .expect("manifests/crd.yaml exists");
    assert!(
        committed == sluice_operator::crd_yaml(),
        "manifests/crd.yaml is out of date: run `cargo run --bin crdgen > manifests/crd.yaml`"
    );
}
