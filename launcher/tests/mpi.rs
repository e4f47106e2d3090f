//! Runs under Open MPI (feature `mpi`; needs `mpirun`): `--hostfile` launches on this machine,
//! and across two network namespaces standing in for two hosts.
#![cfg(feature = "mpi")]

mod common;

use common::{kd_config, make_dataset, student_weights, write, BIN};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A two-epoch KD config writing to `out`.
fn config(dir: &Path, data: &Path, out: &Path) -> PathBuf {
    let name = format!("{}.yaml", out.file_name().unwrap().to_string_lossy());
    kd_config(dir, &name, data, out, 2, 4, "")
}

/// The student's tensors after training into `out`, as bits (compared exactly).
fn weights(cfg: &Path, out: &Path) -> BTreeMap<String, Vec<u32>> {
    student_weights(
        cfg,
        &out.join("DistillationModel/latest"),
        &out.join("exported"),
    )
    .into_iter()
    .map(|(k, v)| (k, v.into_iter().map(f32::to_bits).collect()))
    .collect()
}

fn output(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The same two-rank job under mpirun (`--hostfile`, MPI all-reduce) and under the launcher
/// (`--nproc 2`, TCP) ends with bitwise-equal weights: with two ranks a sum has one order.
#[test]
fn hostfile_run_matches_local_workers_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 16, 3);
    let hosts = write(&dir.join("hosts"), "localhost slots=2\n");
    let mpi_cfg = config(dir, &data, &dir.join("mpi"));
    let tcp_cfg = config(dir, &data, &dir.join("tcp"));
    let (ok, text) = output(Command::new(BIN).args([
        "--hostfile",
        hosts.to_str().unwrap(),
        "--np",
        "2",
        "train",
        "-c",
        mpi_cfg.to_str().unwrap(),
    ]));
    assert!(ok, "{text}");
    assert!(text.contains("done: 2 epochs"), "{text}");
    assert_eq!(
        text.matches("[Train][Epoch 2/2][Iter: 5/6]").count(),
        1,
        "only rank 0 logs to the console:\n{text}"
    );
    for r in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("mpi/workerlog.{r}"))).unwrap();
        assert!(
            log.contains(&format!("rank {r} of 2 (mpi collectives)")),
            "{log}"
        );
    }
    let (ok, text) =
        output(Command::new(BIN).args(["--nproc", "2", "train", "-c", tcp_cfg.to_str().unwrap()]));
    assert!(ok, "{text}");
    let a = weights(&mpi_cfg, &dir.join("mpi"));
    let b = weights(&tcp_cfg, &dir.join("tcp"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert!(v == &b[k], "{k} differs between the MPI and the TCP run");
    }
}

/// Issue 4 (f): two ranks on two "hosts" (network namespaces with their own addresses and host
/// names, started through an rsh agent, as on a cluster), training to the same weights as two
/// local workers.
#[test]
fn two_hosts_in_network_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        // CI runs as root (it installs packages); a developer without root cannot make namespaces.
        eprintln!(
            "SKIPPED two_hosts_in_network_namespaces: creating network namespaces needs root"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 16, 3);
    let cfg = config(dir, &data, &dir.join("two_hosts"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/netns/two_hosts.sh");
    let (ok, text) = output(
        Command::new("bash")
            .arg(&script)
            .arg(BIN)
            .arg(dir.join("netns"))
            .args(["train", "-c", cfg.to_str().unwrap()]),
    );
    assert!(ok, "{text}");
    assert!(text.contains("done: 2 epochs"), "{text}");
    let logs: Vec<String> = (0..2)
        .map(|r| std::fs::read_to_string(dir.join(format!("two_hosts/workerlog.{r}"))).unwrap())
        .collect();
    assert!(
        logs[0].contains("rank 0 (mpi) on host host-a"),
        "{}",
        logs[0]
    );
    assert!(
        logs[1].contains("rank 1 (mpi) on host host-b"),
        "{}",
        logs[1]
    );
    let local_cfg = config(dir, &data, &dir.join("local"));
    let (ok, text) = output(Command::new(BIN).args([
        "--nproc",
        "2",
        "train",
        "-c",
        local_cfg.to_str().unwrap(),
    ]));
    assert!(ok, "{text}");
    let a = weights(&cfg, &dir.join("two_hosts"));
    let b = weights(&local_cfg, &dir.join("local"));
    for (k, v) in &a {
        assert!(
            v == &b[k],
            "{k} differs between the two-host and the local run"
        );
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
