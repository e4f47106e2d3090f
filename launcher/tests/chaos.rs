//! Chaos: a KD run (frozen teacher, trained student) is interrupted again and again at random
//! moments — SIGINT (graceful: `latest` saved after the current step, exit 130) and SIGKILL
//! (nothing saved: the run repeats the work since the last complete `latest`) in turn — and
//! resumed each time from `latest` (from scratch while there is none). It must end with the
//! same student as an uninterrupted run of the same config: the exported
//! `inference.safetensors` bytes are compared (checkpoint records carry random parameter ids,
//! exports do not).
//!
//! Interruptions aim at different phases, each keyed to a log line plus a random delay:
//! start-up (config, models, the frozen-teacher check), any moment, mid-epoch, end of epoch /
//! eval, and checkpoint writing (`latest`, `best_model`, `epoch_N` are written right after the
//! `[best metric` line). Where each one landed is printed, judged by the last log line the test
//! had read when it sent the signal; a SIGKILL that leaves a `.<name>.tmp-<pid>` directory
//! behind provably landed inside the write of checkpoint `<name>`.
//!
//! What is exact: with one process, everything (bitwise). With `--nproc 2`, the weights; the
//! BatchNorm running statistics only to float rounding once a SIGINT stopped the run
//! mid-epoch: the stop averages the two replicas' running statistics (a checkpoint holds one
//! set), where an uninterrupted run averages them at the epoch's end only. The two are equal in
//! exact arithmetic (the update is linear), not in float32. Later steps shrink the difference
//! geometrically (momentum 0.9 per step), so it often rounds away entirely before the end.
//!
//! The interruption plan comes from a fixed-seed generator (printed; `CHAOS_SEED` for another),
//! so a failure replays with the same aims; the moments themselves still depend on the
//! machine's speed.

mod common;

use common::{children_of, kd_config, make_dataset, safetensors_f32, BIN};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The interruption plan's seed: `CHAOS_SEED=<n>` replays or explores another.
fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00C4_A05E)
}

/// One compute thread per process in every run: the same arithmetic in the interrupted and
/// the uninterrupted runs, and gentle on a shared CI machine.
const THREADS: &str = "1";
/// Batches per epoch per worker: 24 images, 4 per step in all.
const ITERS: usize = 6;

/// splitmix64: a small, seeded generator for the interruption plan.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Signal {
    Int,
    Kill,
}

impl Signal {
    fn number(self) -> i32 {
        match self {
            Signal::Int => 2,
            Signal::Kill => 9,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Kill => "SIGKILL",
        }
    }
}

/// Where an interruption aims: a moment after the start, or after a log line of rank 0.
#[derive(Clone, Debug)]
enum Aim {
    /// Within the first tens of ms: start-up (config, models, loader, the frozen-teacher check).
    Startup,
    /// At a random moment of the run's first two epochs or so, whatever it is doing.
    Anytime,
    /// After the training log line of batch index `iter` (of whichever epoch comes first).
    MidEpoch { iter: usize },
    /// After an epoch's `[Train]…[Avg]` line: eval runs next.
    Eval,
    /// After the `[Eval]…[best metric` line: the checkpoints are written next.
    Checkpoint,
}

impl Aim {
    fn draw(rng: &mut Rng) -> (Aim, u64) {
        let aim = match rng.range(0, 8) {
            0 => Aim::Startup,
            1 | 2 => Aim::Anytime,
            3 | 4 => Aim::MidEpoch {
                iter: rng.range(0, ITERS as u64 - 1) as usize,
            },
            5 | 6 => Aim::Eval,
            _ => Aim::Checkpoint,
        };
        // Start-up takes some 40 ms here (debug build), a step some 10 ms (15 with two
        // workers), an eval or a checkpoint write a few ms.
        let delay_ms = match aim {
            Aim::Startup => rng.range(0, 30),
            Aim::Anytime => rng.range(0, 150),
            _ => rng.range(0, 8),
        };
        (aim, delay_ms)
    }

    /// Whether the aim waits for a line (else only for its delay after the start).
    fn line_keyed(&self) -> bool {
        !matches!(self, Aim::Startup | Aim::Anytime)
    }

    fn matches(&self, line: &str) -> bool {
        match self {
            Aim::Startup | Aim::Anytime => false,
            Aim::MidEpoch { iter } => {
                line.contains("[Train][Epoch ") && line.contains(&format!("][Iter: {iter}/"))
            }
            Aim::Eval => line.contains("[Train][Epoch ") && line.contains("][Avg]"),
            Aim::Checkpoint => line.contains("[best metric"),
        }
    }
}

/// The phase an interruption hit, judged by the last log line read before the signal, or by
/// the temporary checkpoint directories a SIGKILL left.
fn landing(last: Option<&str>, new_temp_dirs: &[String]) -> String {
    if !new_temp_dirs.is_empty() {
        // `.epoch_3.tmp-1234` -> `epoch_3`
        let names: Vec<&str> = new_temp_dirs
            .iter()
            .map(|d| d[1..].split(".tmp-").next().unwrap())
            .collect();
        return format!("writing {} (temp dir left)", names.join(", "));
    }
    let Some(line) = last else {
        return "start-up (no log line yet)".into();
    };
    if line.contains("[best metric") || line.contains("new best top1") {
        "checkpoint writing"
    } else if line.contains("[Eval][Epoch") || line.contains("][Avg]") {
        "eval"
    } else if line.contains("[Train][Epoch") {
        if line.contains(&format!("][Iter: {}/{ITERS}]", ITERS - 1)) {
            "epoch end (last batch done)"
        } else {
            "mid-epoch"
        }
    } else {
        "start-up (setup, teacher check)"
    }
    .into()
}

/// A log line without its timestamp and level, cut after its bracketed head
/// (`[Train][Epoch 2/8][Iter: 3/6]`), or at 60 characters.
fn short_line(line: &str) -> String {
    let text = ["INFO ", "WARN ", "ERROR "]
        .iter()
        .find_map(|lvl| line.split_once(lvl).map(|(_, rest)| rest))
        .unwrap_or(line)
        .trim_start();
    let mut end = 0;
    while text[end..].starts_with('[') {
        match text[end..].find(']') {
            Some(close) => end += close + 1,
            None => break,
        }
    }
    if end == 0 {
        text.chars().take(60).collect()
    } else {
        text[..end].to_string()
    }
}

/// kd-launch as built for this test (or `CHAOS_KD_LAUNCH`, another build to try), pinned in
/// `dir` (a hard link, else a copy): a build in a shared target directory may replace the
/// binary at `BIN` while the test runs, and the interrupted and the uninterrupted runs must be
/// the same program.
fn pinned_binary(dir: &Path) -> PathBuf {
    let bin = std::env::var_os("CHAOS_KD_LAUNCH").map_or(PathBuf::from(BIN), PathBuf::from);
    let pinned = dir.join("kd-launch");
    if std::fs::hard_link(&bin, &pinned).is_err() {
        std::fs::copy(&bin, &pinned).expect("copying kd-launch");
    }
    pinned
}

/// A training job under test: the binary, one process or `--nproc 2` (a launcher and two
/// workers), the config and where it checkpoints.
struct Job {
    bin: PathBuf,
    nproc: usize,
    cfg: PathBuf,
    /// `<output_dir>/DistillationModel`.
    arch_dir: PathBuf,
}

/// A started run and its stderr lines (read by a thread, so the child never blocks on a pipe).
struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Job {
    fn train_args(&self, resume: Option<&Path>) -> Vec<String> {
        let mut a = vec![];
        if self.nproc > 1 {
            a.extend(["--nproc".to_string(), self.nproc.to_string()]);
        }
        a.extend(["train".into(), "-c".into(), self.cfg.display().to_string()]);
        if let Some(dir) = resume {
            a.extend(["-o".into(), format!("Global.checkpoints={}", dir.display())]);
        }
        a
    }

    /// Rank 0's lines: a launcher prefixes its workers' lines with the rank.
    fn is_main_line(&self, line: &str) -> bool {
        self.nproc == 1 || line.contains("[rank0]")
    }

    fn latest(&self) -> PathBuf {
        self.arch_dir.join("latest")
    }

    fn start(&self, resume: Option<&Path>) -> Running {
        let mut child = Command::new(&self.bin)
            .args(self.train_args(resume))
            .env("KD_THREADS", THREADS)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kd-launch starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines: rx }
    }

    /// Runs kd-launch with `args` to success; returns its stdout.
    fn run_ok(&self, args: &[String]) -> String {
        let out = Command::new(&self.bin)
            .args(args)
            .env("KD_THREADS", THREADS)
            .output()
            .expect("kd-launch runs");
        assert!(
            out.status.success(),
            "kd-launch {args:?}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into()
    }

    /// The student export of checkpoint `ckpt` into `dir`, as bytes.
    fn export(&self, ckpt: &Path, dir: &Path) -> Vec<u8> {
        self.run_ok(&[
            "export".into(),
            "-c".into(),
            self.cfg.display().to_string(),
            "-o".into(),
            format!("Global.pretrained_model={}", ckpt.display()),
            format!("Global.save_inference_dir={}", dir.display()),
        ]);
        std::fs::read(dir.join("inference.safetensors")).unwrap()
    }

    /// Trains the config uninterrupted into `out` and returns the student export of its
    /// `latest`.
    fn straight_export(&self, out: &Path, export_dir: &Path) -> Vec<u8> {
        let mut args = self.train_args(None);
        args.extend(["-o".into(), format!("Global.output_dir={}", out.display())]);
        self.run_ok(&args);
        self.export(&out.join("DistillationModel/latest"), export_dir)
    }
}

fn wait(child: &mut Child, limit: Duration) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("kd-launch still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `latest`'s position: (epochs done, batches done in the next, optimizer steps).
type Position = (u64, u64, u64);

fn position(latest: &Path) -> Option<Position> {
    let text = std::fs::read_to_string(latest.join("state.json")).ok()?;
    let s: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("torn state.json in {}: {e}\n{text}", latest.display()));
    let n = |k: &str| s[k].as_u64().unwrap();
    Some((n("epoch"), n("step_in_epoch"), n("global_step")))
}

/// Temporary checkpoint directories (`.latest.tmp-<pid>` …) under `arch_dir`.
fn temp_dirs(arch_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(arch_dir) else {
        return vec![];
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.') && n.contains(".tmp-"))
        .collect();
    v.sort();
    v
}

/// Whether `pid` still runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => !stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
    }
}

/// One interruption, as it happened.
struct Interruption {
    signal: Signal,
    aim: Aim,
    delay_ms: u64,
    landed: String,
    last_line: String,
    exit: String,
    /// Workers that were running when their launcher got SIGKILL (all checked gone after).
    workers_killed: usize,
    before: Option<Position>,
    after: Option<Position>,
}

/// Interrupts `job` `n` times (SIGINT first, then SIGKILL, in turn), resuming from `latest`
/// each time (from scratch while there is none), then lets it finish. Returns what happened at
/// each interruption.
fn interrupt_and_resume(job: &Job, n: usize, rng: &mut Rng) -> Vec<Interruption> {
    let latest = job.latest();
    let mut log = vec![];
    for k in 0..n {
        let signal = if k % 2 == 0 {
            Signal::Int
        } else {
            Signal::Kill
        };
        let (aim, delay_ms) = Aim::draw(rng);
        let before = position(&latest);
        let temps_before = temp_dirs(&job.arch_dir);
        let mut r = job.start(before.is_some().then_some(latest.as_path()));
        let t0 = Instant::now();
        // Rank 0's last line read so far, and whether any line came (then the process has its
        // signal handler: it is installed before anything is printed).
        let mut last: Option<String> = None;
        let mut printed = false;
        let mut note = |line: String, last: &mut Option<String>| {
            printed = true;
            let hit = job.is_main_line(&line) && aim.matches(&line);
            if job.is_main_line(&line) {
                *last = Some(line);
            }
            hit
        };
        if aim.line_keyed() {
            loop {
                match r.lines.recv_timeout(Duration::from_millis(50)) {
                    Ok(line) => {
                        if note(line, &mut last) {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        assert!(
                            t0.elapsed() < Duration::from_secs(120),
                            "no {aim:?} line in 120 s"
                        );
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        let st = wait(&mut r.child, Duration::from_secs(60));
                        panic!(
                            "interruption {k} ({aim:?}) found the run over ({st:?}): it needs more epochs"
                        );
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_millis(delay_ms);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(line) = r.lines.recv_timeout(left) {
                note(line, &mut last);
            }
        }
        while let Ok(line) = r.lines.try_recv() {
            note(line, &mut last);
        }
        // A launcher's workers, to check that they die with it (parent-death signal).
        let workers = if job.nproc > 1 && signal == Signal::Kill {
            children_of(r.child.id())
        } else {
            vec![]
        };
        // SAFETY: kill(2) on our own child, which has not been reaped (so the pid is its own).
        unsafe { kill(r.child.id() as i32, signal.number()) };
        let status = wait(&mut r.child, Duration::from_secs(120));
        let rest: Vec<String> = r.lines.iter().collect();
        let t = Instant::now();
        while workers.iter().any(|p| alive(*p)) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in &workers {
            assert!(!alive(*p), "worker {p} outlived its SIGKILLed launcher");
        }
        let after = position(&latest);
        let exit = match (status.code(), status.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => format!("{status:?}"),
        };
        match signal {
            // 130: stopped, `latest` saved. Signal 2 only before the process printed anything
            // (its handler was not installed yet: nothing had started).
            Signal::Int => assert!(
                status.code() == Some(130) || (status.signal() == Some(2) && !printed),
                "SIGINT #{k} ({aim:?} +{delay_ms} ms): {exit}\n{}",
                rest.join("\n")
            ),
            Signal::Kill => assert_eq!(status.signal(), Some(9), "SIGKILL #{k}"),
        }
        // `latest` is always whole (`position` panics on a torn state.json), never goes back,
        // and a graceful stop moves it forward.
        if let (Some(b), Some(a)) = (before, after) {
            assert!(a.2 >= b.2, "latest went back: {b:?} -> {a:?}");
        }
        if status.code() == Some(130) {
            let a = after.expect("a stopped run leaves latest");
            assert!(before.is_none_or(|b| a.2 > b.2), "{before:?} -> {a:?}");
        }
        let new_temps: Vec<String> = temp_dirs(&job.arch_dir)
            .into_iter()
            .filter(|d| !temps_before.contains(d))
            .collect();
        log.push(Interruption {
            signal,
            landed: landing(last.as_deref(), &new_temps),
            aim,
            delay_ms,
            last_line: last.as_deref().map_or("-".to_string(), short_line),
            exit,
            workers_killed: workers.len(),
            before,
            after,
        });
    }
    let resume = position(&latest).is_some().then_some(latest.clone());
    let mut r = job.start(resume.as_deref());
    let status = wait(&mut r.child, Duration::from_secs(300));
    let text: Vec<String> = r.lines.iter().collect();
    assert!(
        status.success(),
        "final resume: {status:?}\n{}",
        text.join("\n")
    );
    log
}

fn report(title: &str, log: &[Interruption]) {
    eprintln!("{title}: {} interruptions", log.len());
    let pos = |p: Option<Position>| {
        p.map_or("none".to_string(), |(e, s, g)| {
            format!("e{e}+{s} (step {g})")
        })
    };
    for (k, i) in log.iter().enumerate() {
        eprintln!(
            "  #{k:<2} {:<7} aim {:<22} +{:>3} ms  landed: {:<34} last line: {:<36} {:<9} latest {} -> {}{}",
            i.signal.name(),
            format!("{:?}", i.aim),
            i.delay_ms,
            i.landed,
            i.last_line,
            i.exit,
            pos(i.before),
            pos(i.after),
            if i.workers_killed > 0 {
                format!(" ({} workers died with the launcher)", i.workers_killed)
            } else {
                String::new()
            }
        );
    }
    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for i in log {
        *counts.entry((i.signal.name(), &i.landed)).or_default() += 1;
    }
    for ((s, l), c) in counts {
        eprintln!("  {s:<7} {l:<34} {c}");
    }
}

/// The tensors that differ: name, how many values, the largest difference relative to the
/// tensor's largest magnitude.
fn differences(a: &[u8], b: &[u8]) -> Vec<(String, usize, f32)> {
    let (ta, tb) = (safetensors_f32(a), safetensors_f32(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let mut out = vec![];
    for (name, x) in &ta {
        let y = &tb[name];
        let differing = x
            .iter()
            .zip(y)
            .filter(|(p, q)| p.to_bits() != q.to_bits())
            .count();
        if differing > 0 {
            let scale = x.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
            let d = x
                .iter()
                .zip(y)
                .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            out.push((name.clone(), differing, d / scale));
        }
    }
    out
}

/// A chaos run and its uninterrupted twin, in a temporary directory.
struct Case {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    job: Job,
}

/// A KD config over 24 generated 20×18 images (16×16 crops, 3 classes): a random frozen
/// resnet8 teacher (the same in every run: same seed) and a `student`, `epochs` epochs of
/// [`ITERS`] batches per worker.
fn case(epochs: usize, nproc: usize, student: &str) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let data = dir.join("data");
    make_dataset(&data, 8, 3);
    let cfg = kd_config(
        &dir,
        "c.yaml",
        &data,
        &dir.join("chaos"),
        epochs,
        4 / nproc,
        "",
    );
    if student != "resnet8" {
        let text = std::fs::read_to_string(&cfg).unwrap().replacen(
            "Student: {name: resnet8}",
            &format!("Student: {{{student}}}"),
            1,
        );
        std::fs::write(&cfg, text).unwrap();
    }
    Case {
        job: Job {
            bin: pinned_binary(&dir),
            nproc,
            cfg,
            arch_dir: dir.join("chaos/DistillationModel"),
        },
        dir,
        _tmp: tmp,
    }
}

impl Case {
    /// The chaos run's final student export and the uninterrupted run's.
    fn exports(&self) -> (Vec<u8>, Vec<u8>) {
        let resumed = self
            .job
            .export(&self.job.latest(), &self.dir.join("export_chaos"));
        let straight = self.job.straight_export(
            &self.dir.join("straight"),
            &self.dir.join("export_straight"),
        );
        (resumed, straight)
    }
}

/// Temporary directories a SIGKILL left in a checkpoint write: nothing removes them later (a
/// later run's temporary name holds its own pid), so they are listed.
fn report_leftovers(job: &Job) {
    let left = temp_dirs(&job.arch_dir);
    if !left.is_empty() {
        eprintln!(
            "  left behind by killed checkpoint writes: {}",
            left.join(", ")
        );
    }
}

fn print_differences(diff: &[(String, usize, f32)]) {
    for (name, n, d) in diff {
        eprintln!("  differs: {name}: {n} values, largest {d:.2e} of its scale");
    }
}

/// One process, 16 interruptions: the resumed student is bitwise the uninterrupted one.
#[test]
fn one_process_interrupted_and_resumed_ends_bitwise_equal() {
    let t0 = Instant::now();
    eprintln!("chaos seed {} (CHAOS_SEED to change)", seed());
    let mut rng = Rng(seed());
    // 16 interruptions move `latest` on by at most one epoch each (the aims come within the
    // first epoch a run reaches; `Anytime` within two): 24 epochs leave room.
    let c = case(24, 1, "resnet8");
    let log = interrupt_and_resume(&c.job, 16, &mut rng);
    report("one process", &log);
    report_leftovers(&c.job);
    let (resumed, straight) = c.exports();
    let diff = differences(&straight, &resumed);
    print_differences(&diff);
    assert!(
        resumed == straight,
        "the interrupted run's student differs from the uninterrupted run's"
    );
    eprintln!("one process: bitwise equal; {:.1?}", t0.elapsed());
}

/// `--nproc 2`, 10 interruptions of the launcher (SIGINT forwarded to the workers; SIGKILL
/// takes the workers with it, checked). Weights are bitwise equal; the BatchNorm running
/// statistics too unless a SIGINT stopped the run mid-epoch, then to float rounding (see the
/// module comment).
#[test]
fn two_workers_interrupted_and_resumed_end_equal() {
    let t0 = Instant::now();
    eprintln!("chaos seed {} (CHAOS_SEED to change)", seed());
    // Another stream than the one-process test's, from the same seed.
    let mut rng = Rng(seed() ^ 0xFF);
    let c = case(16, 2, "resnet8");
    let log = interrupt_and_resume(&c.job, 10, &mut rng);
    report("two workers", &log);
    report_leftovers(&c.job);
    let (resumed, straight) = c.exports();
    let diff = differences(&straight, &resumed);
    print_differences(&diff);
    let stopped_mid_epoch = log
        .iter()
        .any(|i| i.exit == "exit 130" && i.after.is_some_and(|a| a.1 > 0));
    if !stopped_mid_epoch {
        assert!(
            resumed == straight,
            "no mid-epoch stop, yet not bitwise equal"
        );
    }
    for (name, _, d) in &diff {
        assert!(
            name.contains("running_"),
            "{name} differs ({d:.2e} of its scale): only running statistics may"
        );
        assert!(*d < 1e-5, "{name} differs by {d:.2e} of its scale");
    }
    eprintln!(
        "two workers: {}; {:.1?}",
        if diff.is_empty() {
            "bitwise equal".to_string()
        } else {
            format!(
                "weights bitwise equal, {} running-statistics tensors to float rounding",
                diff.len()
            )
        },
        t0.elapsed()
    );
}

/// A student with dropout (PP-LCNet, `dropout_prob` 0.2 by default) draws its masks from the
/// backend's random stream: resumed, the run must draw the masks the uninterrupted run draws
/// at the same step. 6 interruptions, bitwise.
#[test]
fn dropout_student_interrupted_and_resumed_ends_bitwise_equal() {
    let t0 = Instant::now();
    eprintln!("chaos seed {} (CHAOS_SEED to change)", seed());
    let mut rng = Rng(seed() ^ 0xD0);
    let c = case(10, 1, "name: PPLCNet_x0_25");
    let log = interrupt_and_resume(&c.job, 6, &mut rng);
    report("dropout student", &log);
    report_leftovers(&c.job);
    let (resumed, straight) = c.exports();
    let diff = differences(&straight, &resumed);
    print_differences(&diff);
    assert!(
        resumed == straight,
        "the interrupted run's student differs from the uninterrupted run's"
    );
    eprintln!("dropout student: bitwise equal; {:.1?}", t0.elapsed());
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
