//! The test suite of the built `taskhost` binary and its services, as one
//! test binary (one link of every dependency instead of one per file). Each
//! module is one area a user checks; `chaos` (which restarts the shared
//! broker and kills Postgres connections) is its own binary and runs alone.

mod api_edges;
mod asyncapi_examples;
mod bench;
mod bounded_output;
mod chains;
mod console;
mod dashboard;
mod docs_page;
mod events_stream;
mod examples;
mod faults;
mod foundation;
mod hostile;
mod http_limits;
mod jobs;
mod observability;
mod openapi;
mod openapi_responses;
mod replica;
mod routing;
mod sandbox;
mod secrets;
mod smoke;
mod soak;
mod startup;
mod sync;
mod taskfile;
mod tasks;
mod tracing;
mod transport;
mod webhooks;
