//! idem
pub use idem_runtime::*;
