//! Placeholder until the increments service lands.
