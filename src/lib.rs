//! clawterm
