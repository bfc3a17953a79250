//! What the `beit` commands do, as library functions (the CLI is a thin layer over these).

pub mod forward;
