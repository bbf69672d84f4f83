//! Member protocols.
