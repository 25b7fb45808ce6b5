//! The external metrics API serves a renewed certificate without a restart, as when
//! cert-manager rotates the Secret the chart mounts, and keeps the old one when the new
//! files cannot be loaded; both are counted in its metrics.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_operator::external::self_signed;
use sluice_testkit::wait_for;

use common::{Operator, client, metric, namespace, spawn_operator};

/// The SHA-256 fingerprint of the certificate served on `port`, as openssl prints it.
fn served_fingerprint(port: u16) -> Option<String> {
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let x509 = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(client.stdout.take()?)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let _ = client.wait();
    let out = x509.wait_with_output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `sluice_operator_certificate_reloads_total{result}`; `None` while `/metrics` does not
/// answer.
async fn reloads(port: u16, result: &str) -> Option<f64> {
    let name = format!("sluice_operator_certificate_reloads_total{{result=\"{result}\"}} ");
    metric(port, &name).await
}

fn fingerprint_of(pem: &str, dir: &Path) -> String {
    let path = dir.join("probe.pem");
    std::fs::write(&path, pem).expect("write");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&path)
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl reads the certificate");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let client = client().await;
    let ns = namespace(&client).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let first = self_signed(vec!["localhost".to_owned()]).expect("certificate");
    std::fs::write(&cert, &first.cert_pem).expect("write");
    std::fs::write(&key, &first.key_pem).expect("write");

    let cert_arg = cert.display().to_string();
    let key_arg = key.display().to_string();
    let Operator {
        process: mut operator,
        metrics,
        external,
    } = spawn_operator(
        &ns,
        &[
            "--leader-election",
            "false",
            "--tls-cert-file",
            &cert_arg,
            "--tls-key-file",
            &key_arg,
            "--tls-reload-seconds",
            "1",
        ],
    );

    let await_served = |what: &'static str, want: String| {
        wait_for(what, Duration::from_secs(30), move || {
            let want = want.clone();
            async move { Ok((served_fingerprint(external) == Some(want)).then_some(())) }
        })
    };
    let first_print = fingerprint_of(&first.cert_pem, dir.path());
    await_served("the first certificate", first_print.clone())
        .await
        .expect("serves the certificate it started with");

    // Renewed: the key first, then the certificate, as a kubelet update may land.
    let second = self_signed(vec!["localhost".to_owned()]).expect("certificate");
    std::fs::write(&key, &second.key_pem).expect("write");
    std::fs::write(&cert, &second.cert_pem).expect("write");
    let second_print = fingerprint_of(&second.cert_pem, dir.path());
    assert_ne!(first_print, second_print);
    await_served("the renewed certificate", second_print.clone())
        .await
        .expect("serves the renewed certificate");

    // A broken pair is refused, counted, and the renewed certificate stays.
    let failed_before = reloads(metrics, "error").await.unwrap_or(0.0);
    std::fs::write(&cert, "not a certificate").expect("write");
    wait_for(
        "the broken pair to be refused",
        Duration::from_secs(30),
        || async {
            Ok(reloads(metrics, "error")
                .await
                .filter(|n| *n > failed_before)
                .map(|_| ()))
        },
    )
    .await
    .expect("the broken pair is tried and refused");
    assert_eq!(served_fingerprint(external), Some(second_print));
    assert!(
        reloads(metrics, "ok").await.is_some_and(|n| n >= 1.0),
        "the renewal was counted"
    );
    assert!(
        operator.running(),
        "a broken file does not stop the operator"
    );
    operator.kill().expect("stopped");
}
