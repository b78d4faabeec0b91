//! segattn: find the main object in a photo with a vision transformer and
//! show where the transformer looks.
//!
//! The data path reads top to bottom, each module using only those above it:
//! [`image_io`] -> [`preprocess`] -> [`model`] -> [`attention`] -> [`head`]
//! -> [`render`] / [`metrics`] -> [`cli`].

pub mod attention;
pub mod cli;
pub mod head;
pub mod image_io;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod render;
