//! The command line: clap's definitions of kd-launch's options and subcommands.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "kd-launch",
    version,
    about = "Knowledge distillation for image classifiers (PaddleClas-compatible configs)",
    after_help = "Placement: no --gpus/--nproc (or one device) runs the job in this process, the debugging \
mode; --gpus 0,1,.. or --nproc N starts one worker process per device (train, eval); --hostfile H --np N \
runs the ranks under Open MPI's mpirun (build with --features mpi)."
)]
pub struct Cli {
    /// GPU ids, e.g. `0,1,2,3`: one worker per GPU (one id: a single worker in this process).
    #[arg(long, global = true)]
    pub gpus: Option<String>,
    /// Number of CPU worker processes (1: this process).
    #[arg(long, global = true)]
    pub nproc: Option<usize>,
    /// An MPI hostfile (`<host> slots=<n>` lines, see hosts.example): run the job under mpirun.
    #[arg(long, global = true, requires = "np")]
    pub hostfile: Option<PathBuf>,
    /// Number of MPI ranks for --hostfile.
    #[arg(long, global = true)]
    pub np: Option<usize>,
    /// An extra argument for mpirun (repeatable), e.g. `--mpirun-arg=--oversubscribe`.
    #[arg(long = "mpirun-arg", global = true, allow_hyphen_values = true)]
    pub mpirun_args: Vec<String>,
    /// CPU compute threads per worker (default: cores / workers; also KD_THREADS).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Directory for `workerlog.<rank>` files (default: the config's Global.output_dir).
    #[arg(long, global = true)]
    pub log_dir: Option<PathBuf>,
    /// Show every rank's output on the console, not only rank 0's (and others' warnings).
    #[arg(long, global = true)]
    pub log_all_ranks: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// PaddleClas-style YAML config.
    #[arg(short = 'c', long = "config")]
    pub config: PathBuf,
    /// Overrides `Key.path=value` (numeric segments index lists); repeatable.
    #[arg(short = 'o', long = "override", num_args = 1.., action = clap::ArgAction::Append)]
    pub overrides: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a config, build its models and losses, print what would run.
    Check(ConfigArgs),
    /// Train (distill) as the config says.
    Train(ConfigArgs),
    /// Evaluate weights (`-o Global.pretrained_model=<checkpoint dir>`).
    Eval(ConfigArgs),
    /// Export the `infer_model_name` model to `Global.save_inference_dir`.
    Export(ConfigArgs),
    /// Classify images with an export (`--model`) or a config and checkpoint (`-c`).
    Infer {
        #[arg(short = 'c', long = "config", conflicts_with = "model")]
        config: Option<PathBuf>,
        #[arg(short = 'o', long = "override", num_args = 1.., action = clap::ArgAction::Append)]
        overrides: Vec<String>,
        /// Directory written by `kd-launch export`.
        #[arg(long)]
        model: Option<PathBuf>,
        /// An image file or a directory of images (default: Infer.infer_imgs).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Also print every class's logit (e.g. to compare with an ONNX runtime).
        #[arg(long)]
        logits: bool,
    },
    /// Prepare a bundled dataset.
    Dataset {
        #[command(subcommand)]
        which: DatasetCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) → PNG files + list files.
    FashionMnist {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = kd_engine::data::fashion_mnist::DEFAULT_SOURCE)]
        source: PathBuf,
        #[arg(long, default_value_t = 60000)]
        train_count: usize,
        #[arg(long, default_value_t = 10000)]
        val_count: usize,
    },
    /// A generated dataset (stripes, one angle and colour per class) as JPEGs + list files, for
    /// benchmarks and device checks without downloads.
    Synthetic {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1024)]
        train_count: usize,
        #[arg(long, default_value_t = 256)]
        val_count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 256)]
        size: u32,
        #[arg(long, default_value_t = 10)]
        classes: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// SSLD training list: a labelled list plus every image under --unlabeled with label 0.
    SsldList {
        /// The labelled list file (`<path> <label>` lines).
        #[arg(long)]
        list: PathBuf,
        /// A directory of unlabelled images (searched recursively).
        #[arg(long)]
        unlabeled: PathBuf,
        /// The dataset's `image_root`; list paths are written relative to it.
        #[arg(long)]
        image_root: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

impl Command {
    /// Commands that run on every worker of a multi-worker launch (the others run once).
    pub fn distributed(&self) -> bool {
        matches!(self, Command::Train(_) | Command::Eval(_))
    }

    pub fn config_args(&self) -> Option<&ConfigArgs> {
        match self {
            Command::Check(a) | Command::Train(a) | Command::Eval(a) | Command::Export(a) => {
                Some(a)
            }
            _ => None,
        }
    }
}
