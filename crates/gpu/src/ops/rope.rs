//! (kernel family: rope)
