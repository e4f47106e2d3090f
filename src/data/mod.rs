//! Data: the list-file dataset, transforms, the (distributed) batch sampler and the threaded loader.

pub mod config;
pub mod dataset;
pub mod fashion_mnist;
pub mod loader;
pub mod sampler;
pub mod ssld;
pub mod synthetic;
pub mod transforms;

pub use config::{DatasetConfig, InferConfig, LoaderSection, SamplerConfig};
pub use dataset::{ImageNetDataset, Sample};
pub use loader::{load_batch, Batch, Loader, Placement};
pub use sampler::BatchSampler;
pub use transforms::Transform;
