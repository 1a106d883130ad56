//! Pure: a message's MIME (its structure from [`super::mime`]) as a Graph draft (SPEC §7
//! "Large messages over Graph"): the JSON of `POST …/messages`, which part is its body,
//! and which parts are attachments. Graph rebuilds the MIME from this, so what is not
//! listed here (Date, Received, DKIM-Signature, In-Reply-To, References, …) is lost.

use mail_parser::{Address, HeaderName, MessageParser, MimeHeaders};
use serde_json::{Value, json};

use super::mime::{Encoding, Leaf, Structure};
use crate::message::recipients::{self, HeaderFit, Unfit};

/// Attachments under this many bytes go in the draft or by a plain `POST`; from it on,
/// by an upload session.
pub const SMALL_ATTACHMENT: u64 = 3_000_000;
/// A request Graph takes stays under this many bytes.
pub const MAX_REQUEST: usize = 4_000_000;

/// Why a message cannot go the upload way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `multipart/signed`, `multipart/encrypted` or `application/pkcs7-mime`: rebuilding
    /// it would break the signature or lose the encryption.
    Signed(String),
    /// The headers name a recipient the envelope does not, or an envelope recipient
    /// cannot be written.
    Recipients(Unfit),
}

/// One attachment part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Index of its leaf in the structure.
    pub leaf: usize,
    /// File name (from the part, else made up).
    pub name: String,
    /// `type/subtype`.
    pub content_type: String,
    /// Its `Content-ID`, without the angle brackets.
    pub content_id: Option<String>,
    /// `Content-Disposition: inline` (or a `Content-ID` without a disposition).
    pub inline: bool,
    /// How its body is encoded.
    pub encoding: Encoding,
}

/// The draft to create, the leaf that is its body, and its attachments.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The JSON of `POST …/messages`, without attachments and body content.
    pub draft: Value,
    /// The body leaf and whether it is HTML.
    pub body: Option<(usize, bool)>,
    /// Every other leaf.
    pub attachments: Vec<Attachment>,
}

fn parse_headers(raw: &[u8]) -> Option<mail_parser::Message<'static>> {
    let mut owned = raw.to_vec();
    owned.extend_from_slice(b"\r\n\r\n");
    MessageParser::default()
        .parse_headers(&owned)
        .map(|m| m.into_owned())
}

/// `type/subtype` of a header section, lower case; `text/plain` when it has none.
pub fn content_type(headers: &[u8]) -> String {
    parse_headers(headers)
        .and_then(|m| {
            m.content_type().map(|ct| {
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or("octet-stream"))
                    .to_ascii_lowercase()
            })
        })
        .unwrap_or_else(|| "text/plain".to_string())
}

/// Whether a message of this top content type may not be rebuilt.
pub fn signed_or_encrypted(top: &[u8]) -> Option<String> {
    let ct = content_type(top);
    matches!(
        ct.as_str(),
        "multipart/signed"
            | "multipart/encrypted"
            | "application/pkcs7-mime"
            | "application/x-pkcs7-mime"
    )
    .then_some(ct)
}

fn addresses(address: Option<&Address<'_>>) -> Vec<Value> {
    address
        .into_iter()
        .flat_map(|a| a.iter())
        .filter_map(|a| {
            let address = a.address()?.trim();
            (!address.is_empty()).then(|| {
                let mut email = json!({ "address": address });
                if let Some(name) = a.name().map(str::trim).filter(|n| !n.is_empty()) {
                    email["name"] = json!(name);
                }
                json!({ "emailAddress": email })
            })
        })
        .collect()
}

/// What a part's headers say about it as an attachment.
fn attachment(leaf: usize, headers: &[u8], n: usize) -> Attachment {
    let parsed = parse_headers(headers);
    let part = parsed.as_ref().and_then(|m| m.parts.first());
    let content_type = content_type(headers);
    let content_id = part
        .and_then(|p| p.content_id())
        .map(|id| {
            id.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .filter(|id| !id.is_empty());
    let disposition = part
        .and_then(|p| p.content_disposition())
        .map(|d| d.ctype().to_ascii_lowercase());
    let inline = match disposition.as_deref() {
        Some("inline") => true,
        Some(_) => false,
        None => content_id.is_some(),
    };
    let name = part
        .and_then(|p| p.attachment_name())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            if content_type == "message/rfc822" {
                format!("message-{n}.eml")
            } else {
                format!("attachment-{n}")
            }
        });
    let encoding = Encoding::of(part.and_then(|p| p.content_transfer_encoding()));
    Attachment {
        leaf,
        name,
        content_type,
        content_id,
        inline,
        encoding,
    }
}

/// A leaf that may be the message's body: text, not marked as an attachment.
fn body_kind(headers: &[u8]) -> Option<bool> {
    let ct = content_type(headers);
    let is_attachment = parse_headers(headers)
        .and_then(|m| {
            m.parts.first().and_then(|p| {
                p.content_disposition()
                    .map(|d| d.ctype().eq_ignore_ascii_case("attachment"))
            })
        })
        .unwrap_or(false);
    match ct.as_str() {
        _ if is_attachment => None,
        "text/html" => Some(true),
        "text/plain" => Some(false),
        _ => None,
    }
}

/// The plan for a message: `structure` read from it, `recipients` its envelope's.
pub fn plan(structure: &Structure, recipients: &[String]) -> Result<Plan, Refusal> {
    if let Some(ct) = signed_or_encrypted(&structure.top) {
        return Err(Refusal::Signed(ct));
    }
    if let Some(quoted) = recipients
        .iter()
        .find(|r| crate::message::address::has_quoted_local(r))
    {
        return Err(Refusal::Recipients(Unfit::Quoted {
            address: quoted.clone(),
        }));
    }
    let heads = recipients::recipient_headers(&structure.top);
    let missing = match recipients::fit(recipients, &heads) {
        HeaderFit::Fits { missing } => missing,
        HeaderFit::Stranger { field, address } => {
            return Err(Refusal::Recipients(Unfit::Stranger { field, address }));
        }
    };
    let top = parse_headers(&structure.top);
    let mut draft = json!({});
    if let Some(m) = &top {
        draft["subject"] = json!(m.subject().unwrap_or_default());
        draft["toRecipients"] = json!(addresses(m.to()));
        draft["ccRecipients"] = json!(addresses(m.cc()));
        let mut bcc = addresses(m.bcc());
        bcc.extend(
            missing
                .iter()
                .map(|a| json!({ "emailAddress": { "address": a } })),
        );
        draft["bccRecipients"] = json!(bcc);
        let reply_to = addresses(m.reply_to());
        if !reply_to.is_empty() {
            draft["replyTo"] = json!(reply_to);
        }
        if let Some(from) = addresses(m.from()).into_iter().next() {
            draft["from"] = from;
        }
        if let Some(id) = m.message_id().map(str::trim).filter(|i| !i.is_empty()) {
            draft["internetMessageId"] = json!(format!("<{id}>"));
        }
        let mut custom = Vec::new();
        let mut importance = None;
        for header in m.headers() {
            let name = header.name();
            // This header's own value (a repeated name keeps each of its values).
            let value = structure
                .top
                .get(header.offset_start() as usize..header.offset_end() as usize)
                .map(|raw| unfold(&String::from_utf8_lossy(raw)))
                .unwrap_or_default();
            if name.eq_ignore_ascii_case("Importance") {
                importance = match value.to_ascii_lowercase().as_str() {
                    "high" => Some("high"),
                    "low" => Some("low"),
                    "normal" => Some("normal"),
                    _ => importance,
                };
            } else if name.eq_ignore_ascii_case("X-Priority") && importance.is_none() {
                importance = match value.trim().chars().next() {
                    Some('1' | '2') => Some("high"),
                    Some('4' | '5') => Some("low"),
                    Some('3') => Some("normal"),
                    _ => None,
                };
            }
            if matches!(header.name, HeaderName::Other(_))
                && name.len() > 2
                && name[..2].eq_ignore_ascii_case("x-")
            {
                custom.push(json!({ "name": name, "value": value }));
            }
        }
        if let Some(i) = importance {
            draft["importance"] = json!(i);
        }
        if !custom.is_empty() {
            draft["internetMessageHeaders"] = json!(custom);
        }
    } else if !missing.is_empty() {
        draft["bccRecipients"] = json!(
            missing
                .iter()
                .map(|a| json!({ "emailAddress": { "address": a } }))
                .collect::<Vec<_>>()
        );
    }
    let kinds: Vec<Option<bool>> = structure
        .leaves
        .iter()
        .map(|l| body_kind(&l.headers))
        .collect();
    let body = kinds
        .iter()
        .position(|k| *k == Some(true))
        .or_else(|| kinds.iter().position(|k| *k == Some(false)))
        .map(|i| (i, kinds[i] == Some(true)));
    // The other text alternatives of the body are Graph's to make; every other leaf is
    // an attachment.
    let attachments = structure
        .leaves
        .iter()
        .enumerate()
        .filter(|(i, _)| kinds[*i].is_none())
        .enumerate()
        .map(|(n, (i, leaf))| attachment(i, &leaf.headers, n + 1))
        .collect();
    Ok(Plan {
        draft,
        body,
        attachments,
    })
}

/// A raw header value on one line.
fn unfold(value: &str) -> String {
    value
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The body of `leaf` (`raw`: its bytes as in the message) as text for the draft.
pub fn body_text(leaf: &Leaf, raw: &[u8], html: bool) -> String {
    let mut part = leaf.headers.clone();
    part.extend_from_slice(b"\r\n\r\n");
    part.extend_from_slice(raw);
    let Some(m) = MessageParser::default().parse(&part) else {
        return String::from_utf8_lossy(raw).into_owned();
    };
    let text = if html { m.body_html(0) } else { m.body_text(0) };
    text.map(|t| t.into_owned()).unwrap_or_default()
}

/// The `fileAttachment` JSON of `a` with its decoded bytes.
pub fn file_attachment(a: &Attachment, bytes: &[u8]) -> Value {
    use base64::Engine as _;
    let mut v = json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": a.name,
        "contentType": a.content_type,
        "isInline": a.inline,
        "contentBytes": base64::engine::general_purpose::STANDARD.encode(bytes),
    });
    if let Some(id) = &a.content_id {
        v["contentId"] = json!(id);
    }
    v
}

/// The JSON of `POST …/attachments/createUploadSession` for `a` of `size` bytes.
pub fn upload_session(a: &Attachment, size: u64) -> Value {
    let mut item = json!({
        "attachmentType": "file",
        "name": a.name,
        "size": size,
        "contentType": a.content_type,
        "isInline": a.inline,
    });
    if let Some(id) = &a.content_id {
        item["contentId"] = json!(id);
    }
    json!({ "AttachmentItem": item })
}

/// Upload chunk size: a multiple of 320 KiB and at most 4 MiB (SPEC §7). 1.25 MiB: one
/// chunk is what an upload holds in memory, so a smaller one keeps four uploads at once
/// well under the 64 MiB bar (BENCHMARKS.md) for a few more round trips.
pub const CHUNK: usize = 4 * 327_680;

/// The `Content-Range` of a chunk of `len` bytes at `offset` of `total`.
pub fn content_range(offset: u64, len: usize, total: u64) -> String {
    let last = offset.saturating_add(len as u64).saturating_sub(1);
    format!("bytes {offset}-{last}/{total}")
}

#[cfg(test)]
mod tests {
    use super::super::mime::scan;
    use super::*;
    use std::io::Cursor;

    const MSG: &[u8] = b"From: \"Scan Er\" <dave@example.com>\r\nTo: Bob <bob@example.org>\r\nCc: carol@example.org\r\nReply-To: desk@example.com\r\nSubject: =?utf-8?q?Scan_f=C3=BCr_you?=\r\nMessage-ID: <abc@example.com>\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\nX-Priority: 1\r\nX-Scanner: MFP 9000\r\n  folded\r\nX-Tag: a\r\nX-Tag: b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n--a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain\r\n--a\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>gr=C3=BC=C3=9F</p>\r\n--a--\r\n--b\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Disposition: inline\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw==\r\n--b\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--b--\r\n";

    fn plan_of(msg: &[u8], rcpts: &[&str]) -> Result<(Structure, Plan), Refusal> {
        let s = scan(Cursor::new(msg)).unwrap();
        let r: Vec<String> = rcpts.iter().map(|r| r.to_string()).collect();
        plan(&s, &r).map(|p| (s, p))
    }

    #[test]
    fn the_draft_carries_the_listed_headers_and_the_envelope_bcc() {
        let (s, p) = plan_of(
            MSG,
            &["bob@example.org", "carol@example.org", "hidden@example.net"],
        )
        .unwrap();
        let d = &p.draft;
        assert_eq!(d["subject"], "Scan für you");
        assert_eq!(d["from"]["emailAddress"]["address"], "dave@example.com");
        assert_eq!(d["from"]["emailAddress"]["name"], "Scan Er");
        assert_eq!(d["toRecipients"][0]["emailAddress"]["name"], "Bob");
        assert_eq!(
            d["ccRecipients"][0]["emailAddress"]["address"],
            "carol@example.org"
        );
        assert_eq!(
            d["bccRecipients"][0]["emailAddress"]["address"],
            "hidden@example.net"
        );
        assert_eq!(d["bccRecipients"].as_array().unwrap().len(), 1);
        assert_eq!(
            d["replyTo"][0]["emailAddress"]["address"],
            "desk@example.com"
        );
        assert_eq!(d["internetMessageId"], "<abc@example.com>");
        assert_eq!(d["importance"], "high");
        let custom = d["internetMessageHeaders"].as_array().unwrap();
        assert!(
            custom.contains(&json!({"name": "X-Scanner", "value": "MFP 9000 folded"})),
            "{custom:?}"
        );
        assert!(
            custom
                .iter()
                .all(|h| h["name"].as_str().unwrap().starts_with("X-"))
        );
        assert!(
            custom.contains(&json!({"name": "X-Tag", "value": "a"})),
            "{custom:?}"
        );
        assert!(
            custom.contains(&json!({"name": "X-Tag", "value": "b"})),
            "{custom:?}"
        );
        // The HTML alternative is the body; the plain one is Graph's to make.
        let (leaf, html) = p.body.unwrap();
        assert!(html);
        let l = &s.leaves[leaf];
        let text = body_text(l, &MSG[l.start as usize..l.end as usize], true);
        assert_eq!(text.trim(), "<p>grüß</p>");
        let names: Vec<&str> = p.attachments.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["attachment-1", "scan.pdf"]);
        let logo = &p.attachments[0];
        assert!(logo.inline);
        assert_eq!(logo.content_id.as_deref(), Some("logo@x"));
        assert_eq!(logo.content_type, "image/png");
        assert_eq!(logo.encoding, Encoding::Base64);
        assert!(!p.attachments[1].inline);
        let f = file_attachment(logo, b"\x89PNG");
        assert_eq!(f["contentBytes"], "iVBORw==");
        assert_eq!(f["contentId"], "logo@x");
        let u = upload_session(&p.attachments[1], 5_000_000);
        assert_eq!(u["AttachmentItem"]["size"], 5_000_000);
        assert_eq!(u["AttachmentItem"]["name"], "scan.pdf");
    }

    #[test]
    fn a_header_stranger_and_signed_messages_are_refused() {
        assert!(matches!(
            plan_of(MSG, &["bob@example.org"]),
            Err(Refusal::Recipients(Unfit::Stranger { .. }))
        ));
        for ct in [
            "multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=s",
            "application/pkcs7-mime; smime-type=enveloped-data",
            "multipart/encrypted; boundary=e",
        ] {
            let msg = format!(
                "From: dave@example.com\r\nTo: bob@example.org\r\nContent-Type: {ct}\r\n\r\nx\r\n"
            );
            assert!(
                matches!(
                    plan_of(msg.as_bytes(), &["bob@example.org"]),
                    Err(Refusal::Signed(_))
                ),
                "{ct}"
            );
        }
    }

    #[test]
    fn content_ranges_and_the_chunk_size_follow_graphs_rules() {
        const { assert!(CHUNK.is_multiple_of(327_680) && CHUNK <= 4 * 1024 * 1024) };
        assert_eq!(content_range(0, 10, 25), "bytes 0-9/25");
        assert_eq!(content_range(20, 5, 25), "bytes 20-24/25");
    }
}
