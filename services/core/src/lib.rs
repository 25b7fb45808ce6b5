//! Shared parts of the Sluice services.
//!
//! - [`args`]: the flags every service takes (settings, Redis, metrics, logs);
//! - [`confirm`]: how collectors confirm written events to the ingest instance waiting;
//! - [`envelope`]: the one encoding of an event on Kafka and in the stores;
//! - [`settings`]: the pipeline settings file (streams and their topics) every service reads;
//! - [`kafka`]: producer, consumer and admin settings, topic creation;
//! - [`store`]: how records are named in Redis;
//! - [`segment`]: the file sink's segment files and lines;
//! - [`telemetry`] and [`shutdown`]: logging and graceful shutdown for the binaries.

pub mod args;
pub mod confirm;
pub mod envelope;
pub mod kafka;
pub mod segment;
pub mod settings;
pub mod shutdown;
pub mod store;
pub mod telemetry;

pub use envelope::Envelope;
pub use settings::{PipelineSettings, StreamSettings};
