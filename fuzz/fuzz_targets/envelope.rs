//! The envelope decoder collectors run on every Kafka record: any value and header bytes
//! either decode or give an error, and what decodes encodes back to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdkafka::message::{Header, OwnedHeaders};
use sluice_core::Envelope;

fuzz_target!(|data: &[u8]| {
    // The bytes after the first 0xff (never in UTF-8) are a header's value.
    let (value, header) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let headers = header.map(|h| {
        OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some(h),
        })
    });
    if let Ok(envelope) = Envelope::decode(Some(value), headers.as_ref()) {
        let again = Envelope::decode(
            Some(&envelope.encode_value()),
            Some(&envelope.kafka_headers()),
        )
        .expect("an envelope that decoded decodes again from its own encoding");
        assert_eq!(again, envelope);
    }
});
