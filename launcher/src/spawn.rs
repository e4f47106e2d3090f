//! Local multi-worker launches (`--nproc N`, `--gpus 0,1,...`): one child process per device,
//! torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`),
//! output routed per rank, and supervision — the first worker to fail stops the others, Ctrl-C
//! is forwarded once, and no worker outlives the launcher.

use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Environment variable naming the device a spawned worker runs on (`cpu` or `gpu:<id>`).
pub const DEVICE_VAR: &str = "KD_LAUNCH_DEVICE";
/// Lines of each worker's output kept for the failure report.
const TAIL_LINES: usize = 15;
/// How long the other workers get to exit on their own after one fails (they notice the lost
/// peer in their next collective) before they are killed.
const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// What to launch.
pub struct Launch {
    /// The device of each rank: `None` = CPU, `Some(id)` = that GPU.
    pub devices: Vec<Option<usize>>,
    /// kd-launch's own arguments, passed to every worker unchanged.
    pub args: Vec<OsString>,
    /// Where `workerlog.<rank>` files go.
    pub log_dir: PathBuf,
    /// Echo every rank's output to the console (default: rank 0's, and others' warnings/errors).
    pub all_ranks_to_console: bool,
    /// CPU compute threads per worker (None: the worker's default).
    pub threads_per_worker: Option<usize>,
}

struct Worker {
    rank: usize,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    status: Option<ExitStatus>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Killed by the launcher (after another worker failed): never the cause.
    killed: bool,
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!(
            "signal {s}{}",
            if s == libc::SIGKILL { " (SIGKILL)" } else { "" }
        ),
        _ => format!("{status}"),
    }
}

/// A free TCP port on the loopback interface for rank 0 to listen on.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Copies one worker stream line by line to its log file, its tail and (maybe) the console.
/// It reads to the end whatever happens (bytes that are not UTF-8, a closed console), so a
/// worker never blocks on a full pipe.
fn route(
    stream: impl std::io::Read + Send + 'static,
    rank: usize,
    log: Arc<Mutex<File>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    to_console: bool,
    is_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut raw = vec![];
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            let _ = writeln!(log.lock().unwrap(), "{line}");
            {
                let mut t = tail.lock().unwrap();
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line.to_string());
            }
            let important =
                line.contains("ERROR") || line.contains("WARN") || line.starts_with("error");
            if to_console || important {
                // A closed console (`kd-launch ... | head`) must not stop the draining.
                let _ = if is_stderr {
                    writeln!(std::io::stderr().lock(), "[rank{rank}] {line}")
                } else {
                    writeln!(std::io::stdout().lock(), "[rank{rank}] {line}")
                };
            }
        }
    })
}

fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the worker's own process group (it called setpgid(0, 0)).
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// Runs the workers to completion; returns the launcher's exit code.
pub fn run(launch: &Launch, interrupted: &AtomicBool) -> Result<i32> {
    let world = launch.devices.len();
    let port = free_port()?;
    std::fs::create_dir_all(&launch.log_dir)
        .with_context(|| format!("creating the log directory {}", launch.log_dir.display()))?;
    let exe = std::env::current_exe().context("locating the kd-launch executable")?;
    eprintln!(
        "kd-launch: {world} workers ({}), rendezvous 127.0.0.1:{port}, logs {}/workerlog.N",
        describe_devices(&launch.devices),
        launch.log_dir.display()
    );
    let mut workers: Vec<Worker> = vec![];
    for (rank, device) in launch.devices.iter().enumerate() {
        let log_path = launch.log_dir.join(format!("workerlog.{rank}"));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log = Arc::new(Mutex::new(log));
        let mut cmd = Command::new(&exe);
        cmd.args(&launch.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(
                DEVICE_VAR,
                device.map_or("cpu".to_string(), |id| format!("gpu:{id}")),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = launch.threads_per_worker {
            cmd.env("KD_THREADS", t.to_string());
        }
        let launcher_pid = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Own process group: the terminal's Ctrl-C reaches the launcher only, which
                // forwards it once (a worker seeing two interrupts would exit without saving).
                libc::setpgid(0, 0);
                // Killed with the launcher, however the launcher dies.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // A Ctrl-C forwarded before the worker's handler is installed would kill it
                // (the default action), reported as a failed rank: SIGINT stays blocked, so
                // pending, until `signals::install` has the handler in place and unblocks it.
                let mut int: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut int);
                libc::sigaddset(&mut int, libc::SIGINT);
                libc::sigprocmask(libc::SIG_BLOCK, &int, std::ptr::null_mut());
                if libc::getppid() != launcher_pid {
                    libc::_exit(1); // the launcher died before prctl took effect
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for w in &mut workers {
                    signal_group(w.child.id(), libc::SIGKILL);
                    let _ = w.child.wait();
                }
                return Err(e)
                    .with_context(|| format!("starting worker {rank} ({})", exe.display()));
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let echo = rank == 0 || launch.all_ranks_to_console;
        let readers = vec![
            route(
                child.stdout.take().expect("piped"),
                rank,
                log.clone(),
                tail.clone(),
                echo,
                false,
            ),
            route(
                child.stderr.take().expect("piped"),
                rank,
                log,
                tail.clone(),
                echo,
                true,
            ),
        ];
        workers.push(Worker {
            rank,
            child,
            tail,
            status: None,
            readers,
            killed: false,
        });
    }
    supervise(&mut workers, interrupted)
}

fn describe_devices(devices: &[Option<usize>]) -> String {
    if devices.iter().all(Option::is_none) {
        "CPU".to_string()
    } else {
        let ids: Vec<String> = devices
            .iter()
            .map(|d| d.map_or("cpu".into(), |i| format!("GPU {i}")))
            .collect();
        ids.join(", ")
    }
}

fn supervise(workers: &mut [Worker], interrupted: &AtomicBool) -> Result<i32> {
    let mut forwarded = false;
    let mut failure: Option<Instant> = None;
    // Failed ranks in the order they were noticed.
    let mut failed: Vec<usize> = vec![];
    loop {
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            if let Some(st) = w.child.try_wait()? {
                w.status = Some(st);
                let ok = st.success() || (forwarded && st.code() == Some(130));
                if !ok && !w.killed {
                    failed.push(w.rank);
                }
                if !ok && failure.is_none() {
                    failure = Some(Instant::now());
                    eprintln!(
                        "kd-launch: rank {} exited with {}; stopping the other workers",
                        w.rank,
                        describe(st)
                    );
                }
            }
        }
        if workers.iter().all(|w| w.status.is_some()) {
            break;
        }
        if interrupted.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            eprintln!("kd-launch: interrupt: asking every worker to stop after the current step");
            for w in workers.iter().filter(|w| w.status.is_none()) {
                signal_group(w.child.id(), libc::SIGINT);
            }
        }
        if let Some(at) = failure {
            if at.elapsed() > FAILURE_GRACE {
                for w in workers.iter_mut().filter(|w| w.status.is_none()) {
                    w.killed = true;
                    signal_group(w.child.id(), libc::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers.iter_mut() {
        // Anything the worker left in its group goes too (first: it may hold the pipes open).
        signal_group(w.child.id(), libc::SIGKILL);
        for r in w.readers.drain(..) {
            let _ = r.join();
        }
    }
    if failure.is_some() {
        // Report the cause, not a consequence: when one worker dies, the others fail in their
        // next collective ("lost rank N"), possibly noticed in the same poll.
        let failed: Vec<&Worker> = failed.iter().map(|&r| &workers[r]).collect();
        let consequence = |w: &Worker| {
            w.tail
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("lost rank"))
        };
        let cause = failed
            .iter()
            .find(|w| !consequence(w))
            .or(failed.first())
            .expect("a failure was recorded");
        let tail: Vec<String> = cause.tail.lock().unwrap().iter().cloned().collect();
        let others: Vec<String> = failed
            .iter()
            .filter(|w| w.rank != cause.rank)
            .map(|w| format!("rank {} ({})", w.rank, describe(w.status.expect("exited"))))
            .collect();
        bail!(
            "rank {} failed with {}{}; its last lines:\n  {}",
            cause.rank,
            describe(cause.status.expect("exited")),
            if others.is_empty() {
                String::new()
            } else {
                format!(" (then {})", others.join(", "))
            },
            if tail.is_empty() {
                "(no output)".to_string()
            } else {
                tail.join("\n  ")
            }
        );
    }
    if forwarded {
        return Ok(130);
    }
    Ok(0)
}

/// The log directory of a launch: `--log-dir`, else the config's `Global.output_dir`, else `./log`.
pub fn log_dir(explicit: Option<&Path>, output_dir: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| output_dir.map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("log"))
}
