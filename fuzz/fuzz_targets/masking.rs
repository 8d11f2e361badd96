//! The masking path on any bytes from the server: row and COPY rewriting
//! in every format (split at any point), error and notice scrubbing,
//! detectors and masking functions on any text. A value or an error,
//! never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use agentgate::mask::function::{fake_like, mask_text, MaskFn};
use agentgate::mask::plan::{Resolver, RowPlan, RowSource};
use agentgate::mask::rewrite::{self, CopyFormat, CopyMasker, Counts};
use agentgate::mask::{detect, Detector};
use agentgate::policy::masking::MaskSet;
use agentgate::wire::rows::{self, Field};

const POLICY: &str = "masking:
  - name: cols
    columns: [\"*.*.*\"]
    function: partial
    keep: 2
  - name: found
    detect: [email, ssn, card, phone, iban, jwt, api_key, private_key]
";

fn setup() -> &'static (MaskSet, RowPlan) {
    static S: OnceLock<(MaskSet, RowPlan)> = OnceLock::new();
    S.get_or_init(|| {
        let policy = agentgate::policy::compile(&[("p.yaml".into(), POLICY.to_owned())])
            .unwrap_or_else(|_| unreachable!("constant policy"));
        let set = policy.mask_set(&[]);
        let fields: Vec<Field> = [25u32, 23, 20, 3802, 1700, 114, 21]
            .iter()
            .enumerate()
            .map(|(i, t)| Field {
                name: format!("c{i}"),
                table_oid: (i % 2) as u32 * 16384,
                attnum: i as i16,
                type_oid: *t,
                format: (i % 2) as i16,
            })
            .collect();
        let plan = Resolver {
            set: &set,
            catalog: None,
        }
        .plan(&fields, &RowSource::Unknown);
        (set, plan)
    })
}

fuzz_target!(|data: &[u8]| {
    let (set, plan) = setup();
    let mut counts = Counts::new();
    let _ = rows::decode_row_description(data);
    let _ = rows::decode_copy_response(b'H', data);
    let _ = rewrite::data_row(set, plan, data, &mut counts);
    let _ = rewrite::notice(set, b'E', data);
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    for format in [
        CopyFormat::Text { delimiter: b'\t' },
        CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
        },
        CopyFormat::Binary,
    ] {
        let mut m = CopyMasker::new(format, plan.clone());
        let _ = m.data(set, &data[..cut], &mut counts);
        let _ = m.data(set, &data[cut..], &mut counts);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = rewrite::scrub_quoted(text);
        let _ = detect::find(text, &Detector::ALL);
        let _ = fake_like(text);
        for f in [
            MaskFn::Redact,
            MaskFn::Null,
            MaskFn::Partial { keep: 3 },
            MaskFn::Format,
        ] {
            let _ = mask_text(&f, text);
        }
        let _ = agentgate::sql::shape::shape(text, &mut Vec::new());
    }
});
