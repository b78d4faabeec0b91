//! segattn: find the main object in a photo with a vision transformer and
//! show where the transformer looks.
//!
//! The data path reads top to bottom: `model` (encoder and weights).

pub mod model;
