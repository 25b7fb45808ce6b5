//! The container images are built from the binaries the tests run: `docker/Dockerfile`
//! compiles with the same cargo command, profile and features as the test command
//! (`scripts/test`), and every image runs its binary as the unprivileged user the chart
//! and the operator's pods expect.
//!
//! This checks the Dockerfile as a parsed document; the images themselves are built from
//! it with buildah by `scripts/realnode images` and run on the real node
//! (`operator/tests/realnode.rs`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use parse_dockerfile::{Command, Dockerfile, Instruction, Stage};

/// The images, each named after the binary it runs.
const IMAGES: [&str; 4] = [
    "sluice-ingest",
    "sluice-collector",
    "sluice-operator",
    "sluice-loadgen",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A shell command's words, line continuations joined.
fn words(command: &str) -> Vec<String> {
    command
        .replace("\\\n", " ")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The arguments after `cargo <verb>` in a list of words, up to the end of that command.
fn cargo_args(words: &[String], verb: &str) -> Option<BTreeSet<String>> {
    let start = words
        .windows(2)
        .position(|w| w[0] == "cargo" && w[1] == verb)?;
    Some(
        words[start + 2..]
            .iter()
            .take_while(|w| !matches!(w.as_str(), "&&" | ";" | "||" | "|"))
            .cloned()
            .collect(),
    )
}

fn shell_runs<'a>(stage: &'a Stage<'_, '_>) -> Vec<&'a str> {
    stage
        .instructions
        .iter()
        .filter_map(|i| match i {
            Instruction::Run(run) => match &run.arguments {
                Command::Shell(s) => Some(s.value),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn stage<'a, 'b>(file: &'b Dockerfile<'a>, name: &str) -> Stage<'a, 'b> {
    file.stage(name)
        .unwrap_or_else(|| panic!("docker/Dockerfile has no stage {name}"))
}

fn user_of(stage: &Stage<'_, '_>) -> Option<String> {
    stage.instructions.iter().rev().find_map(|i| match i {
        Instruction::User(u) => Some(u.arguments.value.to_string()),
        _ => None,
    })
}

#[test]
fn images_are_built_with_the_test_commands_cargo_profile_and_features() {
    let text = read("docker/Dockerfile");
    let file = parse_dockerfile::parse(&text).expect("docker/Dockerfile parses");

    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-toolchain.toml names a channel");
    let rust_arg = file
        .global_args()
        .find_map(|a| {
            a.arguments
                .value
                .strip_prefix("RUST_VERSION=")
                .map(str::to_owned)
        })
        .expect("the Dockerfile has ARG RUST_VERSION");
    assert_eq!(rust_arg, channel, "the image's Rust is the toolchain's");

    // The dashboard is built from its lockfile and embedded by the compile stage.
    let ui = stage(&file, "ui");
    let ui_runs = shell_runs(&ui);
    assert!(
        ui_runs.iter().any(|r| r.starts_with("npm ci"))
            && ui_runs.iter().any(|r| r.starts_with("npm run build")),
        "the ui stage installs from the lockfile and builds: {ui_runs:?}"
    );
    let build = stage(&file, "build");
    let embeds_ui = build.instructions.iter().any(|i| match i {
        Instruction::Copy(c) => {
            c.options.iter().any(|o| {
                o.name.value == "from" && o.value.as_ref().is_some_and(|v| v.value == "ui")
            }) && c.dest.value == "services/ingest/ui/dist"
        }
        _ => false,
    });
    assert!(
        embeds_ui,
        "the build stage takes the dashboard from the ui stage"
    );
    let runs = shell_runs(&build);
    let build_run = runs
        .iter()
        .find(|r| r.contains("cargo build"))
        .expect("the build stage runs cargo build");
    let image_args = cargo_args(&words(build_run), "build").expect("cargo build arguments");

    let script = read("scripts/test");
    let script_line = |verb: &str| {
        script
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| cargo_args(&words(l), verb))
    };
    let test_build = script_line("build").expect("scripts/test runs cargo build");
    assert_eq!(
        image_args, test_build,
        "docker/Dockerfile and scripts/test must build the binaries alike"
    );
    for flag in ["--locked", "--release", "--bins"] {
        assert!(image_args.contains(flag), "the image build uses {flag}");
    }
    assert!(
        !image_args
            .iter()
            .any(|a| a.starts_with("--features") || a.contains("default-features")),
        "both use the default features"
    );
    let test_run = script_line("test").expect("scripts/test runs cargo test");
    assert!(
        test_run.contains("--release"),
        "the tests run with the profile the images ship: {test_run:?}"
    );

    for name in IMAGES {
        assert!(
            build_run.contains(&format!("target/release/{name}")),
            "the build stage keeps {name} from the release profile"
        );
        let image = stage(&file, name);
        assert_eq!(
            image.from.image.value, "runtime",
            "{name} is built on the runtime stage"
        );
        let copied = image.instructions.iter().any(|i| match i {
            Instruction::Copy(c) => {
                c.options.iter().any(|o| {
                    o.name.value == "from"
                        && o.value.as_ref().is_some_and(|v| v.value == "binaries")
                }) && c.src.iter().any(|s| match s {
                    parse_dockerfile::Source::Path(p) => p.value == format!("/out/{name}"),
                    _ => false,
                }) && c.dest.value == format!("/usr/local/bin/{name}")
            }
            _ => false,
        });
        assert!(copied, "{name} copies /out/{name} from the binaries stage");
        let entrypoint = image.instructions.iter().find_map(|i| match i {
            Instruction::Entrypoint(e) => match &e.arguments {
                Command::Exec(args) => Some(
                    args.value
                        .iter()
                        .map(|a| a.value.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(
            entrypoint,
            Some(vec![format!("/usr/local/bin/{name}")]),
            "{name} runs its binary directly (exec form, so it gets SIGTERM)"
        );
        // The very binary the tests ran exists in the same profile's output.
        sluice_testkit::binary(name).unwrap_or_else(|e| panic!("{e}"));
    }

    // The binaries come from the build stage unless a build asks for prebuilt ones, which
    // must be the same four.
    let default = file
        .global_args()
        .find_map(|a| {
            a.arguments
                .value
                .strip_prefix("BINARIES=")
                .map(str::to_owned)
        })
        .expect("the Dockerfile has ARG BINARIES");
    assert_eq!(default, "build", "images compile their binaries by default");
    assert_eq!(stage(&file, "binaries").from.image.value, "${BINARIES}");
    let prebuilt = stage(&file, "prebuilt");
    let prebuilt_copies: BTreeSet<String> = prebuilt
        .instructions
        .iter()
        .filter_map(|i| match i {
            Instruction::Copy(c) => Some(c),
            _ => None,
        })
        .flat_map(|c| {
            c.src.iter().filter_map(|s| match s {
                parse_dockerfile::Source::Path(p) => Some(p.value.to_string()),
                _ => None,
            })
        })
        .collect();
    assert_eq!(
        prebuilt_copies,
        IMAGES.iter().map(|n| n.to_string()).collect(),
        "the prebuilt stage takes the same binaries"
    );

    let runtime = stage(&file, "runtime");
    let user = user_of(&runtime).expect("the runtime stage sets USER");
    assert_eq!(user, "65532:65532", "images run as the unprivileged user");
    let helpers = read("charts/sluice/templates/_helpers.tpl");
    assert!(
        helpers.contains("runAsUser: 65532") && helpers.contains("runAsNonRoot: true"),
        "the chart runs the operator as the images' user"
    );
}

/// The Debian package of each shared library the binaries load, beyond what every Debian
/// image has (glibc, libgcc).
const LIBRARY_PACKAGES: [(&str, &str); 3] = [
    ("libssl.so.3", "libssl3"),
    ("libcrypto.so.3", "libssl3"),
    ("libz.so.1", "zlib1g"),
];
const BASE_LIBRARIES: [&str; 6] = [
    "linux-vdso.so.1",
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "libpthread.so.0",
];

#[test]
fn the_runtime_image_installs_every_library_the_binaries_load() {
    let text = read("docker/Dockerfile");
    let file = parse_dockerfile::parse(&text).expect("docker/Dockerfile parses");
    let runtime = stage(&file, "runtime");
    let installed: BTreeSet<String> = shell_runs(&runtime).iter().flat_map(|r| words(r)).collect();
    for name in IMAGES {
        let path = sluice_testkit::binary(name).unwrap_or_else(|e| panic!("{e}"));
        let out = std::process::Command::new("ldd")
            .arg(&path)
            .output()
            .expect("ldd runs");
        let listing = String::from_utf8_lossy(&out.stdout);
        for line in listing.lines() {
            let Some(lib) = line.split_whitespace().next() else {
                continue;
            };
            let lib = lib.rsplit('/').next().unwrap_or(lib);
            if BASE_LIBRARIES.contains(&lib) {
                continue;
            }
            let package = LIBRARY_PACKAGES
                .iter()
                .find(|(l, _)| *l == lib)
                .map(|(_, p)| *p)
                .unwrap_or_else(|| {
                    panic!("{name} loads {lib}, which no runtime package is known to provide")
                });
            assert!(
                installed.contains(package),
                "{name} loads {lib}: the runtime stage must install {package}"
            );
        }
    }
}

#[test]
fn the_charts_default_images_are_the_dockerfiles_targets() {
    let values: serde_json::Value =
        serde_yaml_ng::from_str(&read("charts/sluice/values.yaml")).expect("values.yaml parses");
    for (key, name) in [
        ("operator", "sluice-operator"),
        ("ingest", "sluice-ingest"),
        ("collector", "sluice-collector"),
    ] {
        let repository = values["images"][key]["repository"]
            .as_str()
            .unwrap_or_else(|| panic!("images.{key}.repository"));
        assert!(
            repository.ends_with(&format!("/{name}")),
            "images.{key}.repository {repository} is the {name} target"
        );
    }
    let text = read("docker/Dockerfile");
    let file = parse_dockerfile::parse(&text).expect("docker/Dockerfile parses");
    let names: BTreeSet<String> = file
        .stages()
        .filter_map(|s| s.from.as_.as_ref().map(|(_, n)| n.value.to_string()))
        .collect();
    for name in IMAGES {
        assert!(
            names.contains(name),
            "docker/Dockerfile has a target {name}"
        );
    }
}

#[test]
fn the_dev_kafka_for_kind_is_the_version_the_tests_run_against() {
    let pom = read("scripts/kafka/pom.xml");
    let version = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|rest| rest.split("</kafka.version>").next())
        .expect("scripts/kafka/pom.xml names kafka.version");
    let manifest = read("manifests/kafka-dev.yaml");
    let image = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .expect("manifests/kafka-dev.yaml names an image");
    assert_eq!(image, format!("docker.io/apache/kafka:{version}"));
}
