//! One module per subcommand.

pub mod convert;
pub mod score;
pub mod stream;
pub mod train;
