//! Configuration: PaddleClas-compatible YAML → generic tree → `-o` overrides → typed, validated
//! structs. Errors carry the file and the key path (see [`ConfigError`]).

mod schema;
mod tree;

pub use schema::*;
pub use tree::{
    apply_override, load_yaml, override_value, parse_yaml, python_literal, ConfigError,
    ConfigResult, Node,
};
