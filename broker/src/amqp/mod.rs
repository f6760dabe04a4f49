//! AMQP 0-9-1 on the wire: the only module that knows the frame format.

pub mod channel;
pub mod codec;
pub mod connection;
pub mod delivery;
pub mod publish;
pub mod writer;
