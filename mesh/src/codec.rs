//! Length-prefixed postcard framing for request-response protocols, with hard size limits.
//!
//! Every frame is a 4-byte big-endian length followed by that many bytes of postcard. A frame
//! announcing more than the limit is refused before a single byte of its body is read, so an
//! oversized or malicious message costs the receiver four bytes and a stream reset, never its
//! memory or its connection.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A request-response codec for one request and one response type.
pub struct Codec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Codec<Req, Resp> {
    /// A codec refusing requests above `max_request` and responses above `max_response` bytes.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        Codec { max_request, max_response, _types: PhantomData }
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Codec::new(self.max_request, self.max_response)
    }
}

/// Encodes `value` as one frame body, refusing it when it exceeds `max` bytes.
pub fn encode<T: Serialize>(value: &T, max: usize) -> io::Result<Vec<u8>> {
    let bytes = postcard::to_allocvec(value).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("cannot encode message: {e}"))
    })?;
    if bytes.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes exceeds the limit of {max} bytes", bytes.len()),
        ));
    }
    Ok(bytes)
}

async fn read_frame<T, R>(io: &mut R, max: usize) -> io::Result<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the limit of {max} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    postcard::from_bytes(&body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed message: {e}")))
}

/// Encodes `value` as one whole frame (length, then body), refusing it above `max` bytes.
pub fn frame<T: Serialize>(value: &T, max: usize) -> io::Result<Vec<u8>> {
    let body = encode(value, max)?;
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend(body);
    Ok(frame)
}

async fn write_frame<T, W>(io: &mut W, value: &T, max: usize) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    io.write_all(&frame(value, max)?).await?;
    io.flush().await
}

impl<Req, Resp> request_response::Codec for Codec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_response).await
    }
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;
    use request_response::Codec as _;

    use super::*;

    const P: StreamProtocol = StreamProtocol::new("/test/1");

    #[tokio::test]
    async fn round_trips_and_refuses_oversize_before_reading_it() {
        let mut codec: Codec<Vec<u8>, ()> = Codec::new(64, 8);
        let mut buf = Vec::new();
        codec.write_request(&P, &mut Cursor::new(&mut buf), vec![7u8; 10]).await.unwrap();
        let back = codec.read_request(&P, &mut Cursor::new(&buf)).await.unwrap();
        assert_eq!(back, vec![7u8; 10]);

        let err = codec
            .write_request(&P, &mut Cursor::new(Vec::new()), vec![0u8; 100])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("exceeds the limit of 64 bytes"), "{err}");

        // A header announcing 1 GiB with no body: refused on the header alone.
        let huge = (1u32 << 30).to_be_bytes().to_vec();
        let err = codec.read_request(&P, &mut Cursor::new(&huge)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("1073741824 bytes exceeds"), "{err}");
    }

    #[tokio::test]
    async fn malformed_body_is_invalid_data() {
        let mut codec: Codec<(u8, String), ()> = Codec::new(64, 8);
        let mut frame = 3u32.to_be_bytes().to_vec();
        frame.extend([1, 200, 255]);
        let err = codec.read_request(&P, &mut Cursor::new(&frame)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().starts_with("malformed message"), "{err}");
    }
}
