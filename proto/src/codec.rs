//! The gRPC codec of the Konnectivity services: prost, except that a message that does not decode
//! becomes an empty (default) message instead of an error that would end the whole HTTP/2
//! stream. All of an agent's tunnelled connections share that one stream, so a malformed frame
//! must not take them all down: the empty `Packet` carries no payload and the receivers treat it
//! as malformed (they log it, and close the stream it belongs to when one can be named).
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

/// prost encoding, lenient decoding (see the module docs).
#[derive(Debug, Clone)]
pub struct LenientCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for LenientCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for LenientCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LenientDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LenientDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; an undecodable message yields `U::default()`.
#[derive(Debug, Clone)]
pub struct LenientDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for LenientDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Take the whole message (zero-copy) so nothing is left behind on failure.
        let bytes = buf.copy_to_bytes(buf.remaining());
        Ok(Some(U::decode(bytes).unwrap_or_default()))
    }
}
