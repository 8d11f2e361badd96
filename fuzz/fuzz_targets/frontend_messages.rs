//! Every decoder the gateway runs on client input, on any body: a value or
//! an error, never a panic. Startup packets and statement analysis too.
#![no_main]

use libfuzzer_sys::fuzz_target;

use agentgate::wire::{backend, frontend, startup};

fuzz_target!(|data: &[u8]| {
    let _ = frontend::decode_query(data).and_then(|t| t.check());
    let _ = frontend::decode_parse(data).and_then(|p| p.query.check());
    let _ = frontend::decode_bind(data);
    let _ = frontend::decode_execute(data);
    let _ = frontend::decode_target(frontend::DESCRIBE, data);
    let _ = frontend::decode_empty(frontend::SYNC, data);
    let _ = frontend::decode_copy_fail(data);
    let _ = startup::decode(data);
    let _ = backend::decode_error_fields(backend::ERROR_RESPONSE, data);
    let _ = backend::decode_command_complete(data);
    if let Ok(text) = frontend::decode_query(data).and_then(|t| t.check()) {
        let _ = agentgate::sql::analyze(text);
    }
});
