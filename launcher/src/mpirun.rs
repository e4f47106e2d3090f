//! Multi-node launches: `kd-launch --hostfile hosts --np N ...` runs this same binary under Open
//! MPI's `mpirun`; each MPI rank is a worker that learns its rank from MPI
//! (`OMPI_COMM_WORLD_*`) and exchanges gradients over MPI (cargo feature `mpi`).

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set in every rank's environment by [`run`]; tells kd-launch it is an MPI worker.
pub const MPI_WORKER_VAR: &str = "KD_LAUNCH_MPI";

/// The rank of this process in an `mpirun` job started by kd-launch, if it is one.
pub fn worker_rank() -> Option<(usize, usize, usize)> {
    std::env::var_os(MPI_WORKER_VAR)?;
    let var = |k: &str| std::env::var(k).ok()?.parse::<usize>().ok();
    Some((
        var("OMPI_COMM_WORLD_RANK")?,
        var("OMPI_COMM_WORLD_SIZE")?,
        var("OMPI_COMM_WORLD_LOCAL_RANK").unwrap_or(0),
    ))
}

/// Runs `args` as an `np`-rank job over `hostfile`; returns the exit code.
pub fn run(
    hostfile: &Path,
    np: usize,
    args: &[OsString],
    mpirun_args: &[String],
    threads: Option<usize>,
    interrupted: &AtomicBool,
) -> Result<i32> {
    if !kd_engine::parallel::MPI_AVAILABLE {
        bail!("--hostfile: {}", kd_engine::parallel::MPI_MISSING);
    }
    if !hostfile.is_file() {
        bail!(
            "--hostfile {}: no such file (format: one `<host> slots=<n>` line per node; see hosts.example)",
            hostfile.display()
        );
    }
    let exe = std::env::current_exe().context("locating the kd-launch executable")?;
    let mut cmd = Command::new("mpirun");
    cmd.arg("--hostfile")
        .arg(hostfile)
        .arg("-np")
        .arg(np.to_string());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Containers and CI run as root; Open MPI refuses that unless told.
        cmd.arg("--allow-run-as-root");
    }
    cmd.arg("-x").arg(format!("{MPI_WORKER_VAR}=1"));
    if let Some(t) = threads {
        cmd.arg("-x").arg(format!("KD_THREADS={t}"));
    }
    for v in ["RUST_LOG", "RUST_BACKTRACE"] {
        if std::env::var_os(v).is_some() {
            cmd.arg("-x").arg(v);
        }
    }
    cmd.args(mpirun_args).arg(&exe).args(args);
    tracing::info!("running {cmd:?}");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "mpirun not found: install Open MPI (Debian/Ubuntu: `apt-get install openmpi-bin`) on every node"
        ),
        Err(e) => return Err(e).context("starting mpirun"),
    };
    let mut forwarded = false;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(match st.code() {
                Some(0) => 0,
                _ if forwarded => 130,
                Some(c) => {
                    eprintln!("kd-launch: mpirun exited with status {c}");
                    c
                }
                None => 1,
            });
        }
        if interrupted.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            // mpirun forwards SIGUSR1 to every rank, on every node; ranks treat it as Ctrl-C.
            eprintln!("kd-launch: interrupt: asking every rank to stop after the current step");
            // SAFETY: kill(2) on our child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGUSR1);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
