//! The job store: the one owner of the `jobs` row. Every write to `jobs`
//! lives here, as functions named after the arrows of
//! `docs/state_machine.md`, each set-based over a batch and writing its
//! `data_change` rows in the same transaction.

pub mod fire;
