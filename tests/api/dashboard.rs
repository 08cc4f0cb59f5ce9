//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver).
//! The pages are clients of the staff API; these tests log in through the form, watch rows
//! change live as devices handshake, report and get assigned (the same DOM node, no reload),
//! send a command from a device's page and follow it through the device's poll and result,
//! and check what a read-only user sees. Plain HTTP checks cover redirects, headers and the
//! live feed's authentication without a browser.
//!
//! Chromium and chromedriver (Debian `chromium` and `chromium-driver`) are needed; without
//! them the browser tests say so and skip, except under `CI=true`.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, Staff, TestApp};

const PASSWORD: &str = "correct horse battery";

/// A headless Chromium session. Dropped (also when a test fails), it ends the session, which
/// closes the browser, and then stops chromedriver.
struct Browser {
    client: Client,
    session: Option<String>,
    driver: Driver,
}

/// chromedriver, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        // The async client cannot be used while its runtime unwinds: a plain WebDriver
        // `DELETE /session/{id}` ends the browser before chromedriver is stopped.
        let Some(session) = self.session.take() else {
            return;
        };
        let port = self.driver.port;
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(
                stream,
                "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.read(&mut [0u8; 1024]);
        }
    }
}

fn find_program(candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|path| std::path::Path::new(path).exists())
        .map(|path| (*path).to_owned())
}

/// Starts chromedriver on a port of its choosing and opens a browser session, or `None` (with a
/// loud note) when Chromium is not installed. Under `CI=true` a missing browser fails.
async fn browser() -> Option<Browser> {
    let driver = find_program(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    let chromium = find_program(&["/usr/lib/chromium/chromium", "/usr/bin/chromium"]);
    let (Some(driver), Some(chromium)) = (driver, chromium) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium and chromedriver are required in CI (Debian packages chromium chromium-driver)"
        );
        eprintln!(
            "SKIPPED: chromium/chromedriver not installed (apt install chromium chromium-driver)"
        );
        return None;
    };
    let mut child = Command::new(driver)
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let stdout = child.stdout.take().expect("chromedriver stdout");
    let mut driver = Driver { child, port: 0 };
    // "ChromeDriver was started successfully on port 41235."
    let port = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let port = lines.by_ref().map_while(Result::ok).find_map(|line| {
            let (_, rest) = line.split_once("started successfully on port ")?;
            rest.trim_end_matches('.').trim().parse::<u16>().ok()
        });
        // Keep draining so chromedriver never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        port
    })
    .await
    .expect("read chromedriver output")
    .expect("chromedriver printed its port");
    driver.port = port;
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--lang=en-US"
            ]
        }
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("open a browser session");
    let session = client.session_id().await.expect("session id");
    Some(Browser {
        client,
        session,
        driver,
    })
}

impl Browser {
    async fn goto(&self, app: &TestApp, path: &str) {
        self.client.goto(&app.url(path)).await.expect("navigate");
    }

    async fn path(&self) -> String {
        let url = self.client.current_url().await.expect("current url");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Evaluates `expression` until it is truthy (within 10 s) and returns its value.
    async fn until(&self, what: &str, expression: &str) -> Value {
        let script = format!("return ({expression});");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.js(&script).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0);
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                let body = self.js("return document.body.innerText;").await;
                panic!("timed out waiting for {what} ({expression}); page shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.expect(css);
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .expect(css)
            .click()
            .await
            .expect("click");
    }

    /// Logs in through the form on the page the browser is on.
    async fn log_in(&self, username: &str) {
        self.until("the login form", "document.querySelector('#login-form')")
            .await;
        self.fill("#username", username).await;
        self.fill("#password", PASSWORD).await;
        self.click("#login-submit").await;
        self.until(
            "the page after login",
            "document.body.dataset.page !== 'login' && document.querySelector('#whoami').textContent",
        )
        .await;
    }

    /// Saves a screenshot as `{name}.png` in `OZONE_SCREENSHOTS` when that names a directory
    /// (the README's pictures under `docs/` are taken this way).
    async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("OZONE_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png)
            .expect("write the screenshot");
    }

    async fn close(mut self) {
        self.session = None;
        let _ = self.client.clone().close().await;
    }
}

/// The JavaScript expression for a device's row in the devices table.
fn row(device_id: &str) -> String {
    format!("document.querySelector('#devices tr[data-key=\"{device_id}\"]')")
}

async fn machine(app: &TestApp, staff: &Staff, name: &str, code: &str) -> i64 {
    let reply = app
        .staff_post(
            "/api/machines/",
            staff,
            &json!({"name": name, "machine_code": code, "is_active": true}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.body["id"].as_i64().expect("machine id")
}

#[tokio::test]
async fn staff_follow_devices_live_and_send_a_command_from_the_browser() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let Some(browser) = browser().await else {
        return;
    };

    // Anonymous: sent to the login page, and back to where it was going afterwards.
    browser.goto(&app, "/").await;
    browser
        .until("the login page", "document.body.dataset.page === 'login'")
        .await;
    assert_eq!(browser.path().await, "/login/?next=%2Fdevices");
    browser.log_in("staff").await;
    assert_eq!(browser.path().await, "/devices");
    browser
        .until(
            "an empty devices table",
            "document.querySelector('#devices tbody').innerText.includes('No devices')",
        )
        .await;
    browser
        .until("the live feed", "document.querySelector('#live.on')")
        .await;
    browser.js("window.sameDocument = true; return 1;").await;

    // A device handshakes: its row appears without a reload.
    let device = app.handshake("AA:BB:CC:00:00:01").await;
    browser
        .until("the new device's row", &row(&device.device_id))
        .await;
    browser
        .js(&format!(
            "window.watched = {}; return 1;",
            row(&device.device_id)
        ))
        .await;
    // Assigned through the API, polling, then reporting counters: the same row node changes.
    let machine_id = machine(&app, &staff, "Washer 1", "CH1/001/2025").await;
    let assigned = app
        .staff_post(
            &format!("/api/machines/{machine_id}/assign/"),
            &staff,
            &json!({"device_id": device.device_id}),
        )
        .await;
    assert_eq!(assigned.status, 200, "{}", assigned.body);
    browser
        .until(
            "the machine in the row",
            &format!(
                "{}.cells[3].innerText.includes('Washer 1')",
                row(&device.device_id)
            ),
        )
        .await;
    // Its first poll makes it online.
    assert_eq!(app.poll(&device).await.status, 200);
    browser
        .until(
            "the device online",
            &format!("{}.cells[0].innerText === 'online'", row(&device.device_id)),
        )
        .await;
    let event = app
        .post_event(
            &device,
            "ev-1",
            json!({
                "ts": chrono::Utc::now().to_rfc3339(),
                "current_counters": {"basic": 5, "standard": 2, "premium": 1}
            }),
        )
        .await;
    assert_eq!(event.status, 200, "{}", event.body);
    browser
        .until(
            "the reported counters",
            &format!(
                "{r}.cells[4].innerText === '5' && {r}.cells[5].innerText === '2'",
                r = row(&device.device_id)
            ),
        )
        .await;
    let same = browser
        .js(&format!(
            "return window.sameDocument === true && window.watched === {};",
            row(&device.device_id)
        ))
        .await;
    assert_eq!(same, true, "the row was replaced or the page reloaded");
    browser.screenshot("dashboard-devices").await;

    // A longer fleet: scrolled down, the page keeps its place when a row changes.
    for i in 2..=40 {
        app.handshake(&format!("AA:BB:CC:00:01:{i:02X}")).await;
    }
    browser
        .until(
            "the whole fleet",
            "document.querySelectorAll('#devices tbody tr[data-key]').length === 40",
        )
        .await;
    let scrolled = browser
        .js("window.scrollTo(0, document.body.scrollHeight); return window.scrollY;")
        .await;
    assert!(
        scrolled.as_f64().unwrap_or(0.0) > 0.0,
        "the page can scroll"
    );
    let event = app
        .post_event(
            &device,
            "ev-2",
            json!({
                "ts": chrono::Utc::now().to_rfc3339(),
                "current_counters": {"basic": 6, "standard": 2, "premium": 1}
            }),
        )
        .await;
    assert_eq!(event.status, 200, "{}", event.body);
    browser
        .until(
            "the new count",
            &format!("{}.cells[4].innerText === '6'", row(&device.device_id)),
        )
        .await;
    assert_eq!(browser.js("return window.scrollY;").await, scrolled);

    // The device's page: an invalid payload is refused before anything is sent.
    browser
        .goto(&app, &format!("/devices/{}/", device.device_id))
        .await;
    browser
        .until(
            "the device's page",
            "document.querySelector('#d-facts [data-field=mac]').innerText === 'AA:BB:CC:00:00:01'",
        )
        .await;
    browser.fill("#c-type", "RESET").await;
    browser.fill("#c-payload", "{not json").await;
    browser.click("#c-send").await;
    browser
        .until(
            "the payload error",
            "!document.querySelector('#c-error').hidden && document.querySelector('#c-error').innerText.includes('not valid JSON')",
        )
        .await;
    let commands_path = format!("/api/device/{}/commands/status/", device.device_id);
    assert_eq!(app.staff_get(&commands_path, &staff).await.body["count"], 0);

    browser.fill("#c-payload", r#"{"reason": "browser"}"#).await;
    browser.click("#c-send").await;
    let command_id = browser
        .until(
            "the command in the history",
            "document.querySelector('#commands tbody tr[data-key]')?.dataset.key",
        )
        .await;
    let listed = app.staff_get(&commands_path, &staff).await;
    assert_eq!(listed.body["count"], 1, "{}", listed.body);
    assert_eq!(listed.body["results"][0]["command_id"], command_id);
    assert_eq!(listed.body["results"][0]["command_type"], "RESET");
    assert_eq!(listed.body["results"][0]["payload"]["reason"], "browser");
    assert_eq!(listed.body["results"][0]["created_by"], "staff");
    let status_cell = "document.querySelector('#commands tbody tr[data-key]').cells[0].innerText";
    browser
        .until("a pending command", &format!("{status_cell} === 'pending'"))
        .await;

    // The device polls and reports: the status follows live.
    let command_id = command_id.as_str().expect("command id").to_owned();
    assert_eq!(app.poll(&device).await.status, 200);
    browser
        .until("a sent command", &format!("{status_cell} === 'sent'"))
        .await;
    let result = app
        .report(&device, &command_id, json!({"success": true}))
        .await;
    assert_eq!(result.status, 200, "{}", result.body);
    browser
        .until(
            "an executed command",
            &format!("{status_cell} === 'executed'"),
        )
        .await;
    browser
        .until(
            "counters zeroed by the reset",
            "document.querySelector('[data-field=counts]').innerText.includes('Basic 0')",
        )
        .await;

    // Cancel a queued command from the page, then put it back with Retry.
    browser.fill("#c-type", "REBOOT").await;
    browser.fill("#c-payload", "").await;
    browser.click("#c-send").await;
    let reboot = browser
        .until(
            "the second command",
            "(() => { const rows = document.querySelectorAll('#commands tbody tr[data-key]'); \
             return rows.length === 2 && rows[0].dataset.key; })()",
        )
        .await;
    let reboot = reboot.as_str().expect("command id").to_owned();
    assert_ne!(reboot, command_id);
    let reboot_row = format!("document.querySelector('#commands tr[data-key=\"{reboot}\"]')");
    browser
        .until(
            "a pending reboot",
            &format!("{reboot_row}.cells[0].innerText === 'pending'"),
        )
        .await;
    browser
        .click(&format!("#commands tr[data-key=\"{reboot}\"] button"))
        .await;
    browser
        .until(
            "a cancelled reboot",
            &format!("{reboot_row}.cells[0].innerText === 'cancelled'"),
        )
        .await;
    let cancelled = app
        .staff_get(&format!("/api/commands/{reboot}/"), &staff)
        .await;
    assert_eq!(cancelled.body["status"], "cancelled", "{}", cancelled.body);
    browser
        .until(
            "the retry button",
            &format!("{reboot_row}.querySelector('button')?.innerText === 'Retry'"),
        )
        .await;
    browser
        .click(&format!("#commands tr[data-key=\"{reboot}\"] button"))
        .await;
    browser
        .until(
            "a queued reboot again",
            &format!("{reboot_row}.cells[0].innerText === 'pending'"),
        )
        .await;
    let retried = app
        .staff_get(&format!("/api/commands/{reboot}/"), &staff)
        .await;
    assert_eq!(retried.body["status"], "pending", "{}", retried.body);
    assert_eq!(retried.body["retry_count"], 1, "{}", retried.body);

    // The machine's logs: the treatment and the reset, newest first, with cumulative counters.
    browser
        .goto(&app, &format!("/machines/{machine_id}/logs/"))
        .await;
    let rows = browser
        .until(
            "the log rows",
            "(() => { const rows = [...document.querySelectorAll('#logs tbody tr[data-key]')]; \
             return rows.length >= 3 && rows.map(r => [...r.cells].slice(1).map(c => c.innerText)); })()",
        )
        .await;
    assert_eq!(
        rows,
        json!([
            ["Reset", device.device_id, "0", "0", "0"],
            ["Treatment basic", device.device_id, "6", "2", "1"],
            ["Treatment basic", device.device_id, "5", "2", "1"]
        ])
    );
    let logs = app
        .staff_get(&format!("/api/machines/{machine_id}/logs/"), &staff)
        .await;
    assert_eq!(logs.body["count"], 3, "{}", logs.body);

    // Statistics: the chart and its table show what the API answers for the same filters.
    browser.goto(&app, "/stats/").await;
    let shown = browser
        .until(
            "the stats table's total",
            "(() => { const row = document.querySelector('#stats tbody tr[data-key=\"Total\"]'); \
             return row && document.querySelector('#chart svg path') && [...row.cells].slice(1).map(c => Number(c.innerText)); })()",
        )
        .await;
    let csv = browser
        .js("return document.querySelector('#s-csv').getAttribute('href');")
        .await;
    let query = csv
        .as_str()
        .and_then(|href| href.split_once('?'))
        .map(|(_, q)| q.to_owned())
        .expect("the CSV link carries the filters");
    let stats = app
        .staff_get(&format!("/api/test/stats/?{query}"), &staff)
        .await;
    assert_eq!(stats.status, 200, "{}", stats.body);
    let totals = &stats.body["totals"];
    assert_eq!(
        shown,
        json!([
            totals["basic"],
            totals["standard"],
            totals["premium"],
            totals["total"]
        ])
    );
    assert_eq!(totals["total"], 2, "two treatments in the last 7 days");
    browser.screenshot("dashboard-stats").await;

    // Assigning from the machines page: a free device picked for a machine without one.
    let second = machine(&app, &staff, "Washer 2", "CH1/002/2025").await;
    browser.goto(&app, "/machines/").await;
    let picker = format!("#machines tr[data-key=\"{second}\"] select");
    browser
        .until(
            "the free devices in the picker",
            &format!("document.querySelector('{picker}')?.options.length === 40"),
        )
        .await;
    browser
        .client
        .find(Locator::Css(&picker))
        .await
        .expect("picker")
        .select_by_value("AA:BB:CC:00:01:02")
        .await
        .expect("pick a device");
    browser
        .click(&format!("#machines tr[data-key=\"{second}\"] button"))
        .await;
    browser
        .until(
            "the assigned device in the row",
            &format!(
                "document.querySelector('#machines tr[data-key=\"{second}\"]').cells[4].innerText === 'AA:BB:CC:00:01:02'"
            ),
        )
        .await;
    let bound = app
        .staff_get(&format!("/api/machines/{second}/"), &staff)
        .await;
    assert_eq!(
        bound.body["device_id"], "AA:BB:CC:00:01:02",
        "{}",
        bound.body
    );

    // A note is text, never markup.
    browser
        .goto(&app, &format!("/devices/{}/", device.device_id))
        .await;
    let note = "<img src=x onerror=\"window.injected=1\"><script>window.injected=1</script>";
    let patched = app
        .staff_call(
            Method::PATCH,
            &format!("/api/devices/{}/", device.device_id),
            Some(&staff.token),
            Some(&json!({"notes": note})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    browser
        .until(
            "the note as text",
            &format!(
                "document.querySelector('#notes').value === {}",
                serde_json::to_string(note).unwrap()
            ),
        )
        .await;
    let injected = browser
        .js("return window.injected === undefined && !document.querySelector('main img');")
        .await;
    assert_eq!(injected, true);

    browser.close().await;
}

#[tokio::test]
async fn read_only_users_see_no_mutating_controls() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let viewer = app.user("viewer", false, false).await;
    let device = app.handshake("AA:BB:CC:00:00:02").await;
    machine(&app, &staff, "Washer 2", "CH1/002/2025").await;
    let Some(browser) = browser().await else {
        return;
    };

    browser
        .goto(&app, &format!("/devices/{}/", device.device_id))
        .await;
    browser.log_in("viewer").await;
    browser
        .until(
            "the device's page",
            "document.querySelector('#d-facts [data-field=mac]').innerText === 'AA:BB:CC:00:00:02'",
        )
        .await;
    let controls = browser
        .js(
            "return [...document.querySelectorAll('#command-form, #reset-token, #notes-form button')].length;",
        )
        .await;
    assert_eq!(controls, 0, "a read-only user sees mutating controls");
    assert!(browser
        .js("return document.querySelector('#whoami').innerText;")
        .await
        .as_str()
        .is_some_and(|s| s.contains("read-only")));

    browser.goto(&app, "/machines/").await;
    browser
        .until(
            "the machines table",
            "document.querySelector('#machines tbody tr[data-key]')",
        )
        .await;
    let buttons = browser
        .js("return [...document.querySelectorAll('main button, main select, main form')].map(b => b.innerText || b.tagName);")
        .await;
    assert_eq!(buttons, json!([]), "controls on the machines page");

    // Outlets with their machines and treatments, and no edit controls.
    let outlet = app
        .staff_post("/api/outlets/", &staff, &json!({"name": "Grand <Mall>"}))
        .await;
    assert_eq!(outlet.status, 201, "{}", outlet.body);
    browser.goto(&app, "/outlets/").await;
    let cells = browser
        .until(
            "the outlet with its treatment counts",
            "(() => { const row = document.querySelector('#outlets tbody tr[data-key]'); \
             return row && row.cells[9].innerText !== '…' && [...row.cells].map(c => c.innerText); })()",
        )
        .await;
    assert_eq!(
        cells,
        json!([
            "Grand <Mall>",
            "—",
            "—",
            "—",
            "yes",
            "0",
            "0",
            "0",
            "0",
            "0"
        ])
    );
    let controls = browser
        .js("return document.querySelectorAll('main button, main form').length;")
        .await;
    assert_eq!(controls, 0, "controls on the outlets page");

    // Forcing a mutation is refused by the API.
    let forced = app
        .staff_post(
            &format!("/api/device/{}/commands/create/", device.device_id),
            &viewer,
            &json!({"command_type": "RESET"}),
        )
        .await;
    forced.assert_error(403, "staff_required");

    browser.close().await;
}

#[tokio::test]
async fn pages_need_a_session_and_are_served_compressed_with_validators() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let anonymous = client.get(app.url("/machines/")).send().await.unwrap();
    assert_eq!(anonymous.status(), 303);
    assert_eq!(anonymous.headers()["location"], "/login/?next=%2Fmachines");
    let login = client.get(app.url("/login/")).send().await.unwrap();
    assert_eq!(login.status(), 200);
    let home = client
        .get(app.url("/"))
        .header("cookie", format!("ozone_token={}", staff.token))
        .send()
        .await
        .unwrap();
    assert_eq!(home.status(), 303);
    assert_eq!(home.headers()["location"], "/devices/");

    let page = client
        .get(app.url("/devices/"))
        .header("cookie", format!("ozone_token={}", staff.token))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-encoding"], "gzip");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    let body = page.bytes().await.unwrap();
    assert_eq!(&body[..2], &[0x1f, 0x8b], "a gzip stream");

    // The script is linked by its content hash and revalidates to 304.
    let plain = client
        .get(app.url("/devices/"))
        .header("cookie", format!("ozone_token={}", staff.token))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let script = plain
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("script link")
        .to_owned();
    assert!(script.starts_with("/static/app.js?v="), "{script}");
    let asset = client.get(app.url(&script)).send().await.unwrap();
    assert_eq!(asset.status(), 200);
    assert!(asset.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    let etag = asset.headers()["etag"].clone();
    let again = client
        .get(app.url(&script))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    // The live feed needs a session too, and answers as an event stream.
    app.get("/api/stream/", None)
        .await
        .assert_error(401, "missing_token");
    let feed = client
        .get(app.url("/api/stream/"))
        .bearer_auth(&staff.token)
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);
    assert!(feed.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(feed.headers().get("content-encoding").is_none());
}

#[tokio::test]
async fn open_live_feeds_do_not_hold_up_shutdown() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let mut feed = reqwest::Client::new()
        .get(app.url("/api/stream/"))
        .bearer_auth(&staff.token)
        .send()
        .await
        .unwrap();
    let first = feed.chunk().await.unwrap().expect("the ready event");
    assert!(String::from_utf8_lossy(&first).contains("event: ready"));
    let started = std::time::Instant::now();
    drop(app.stop().await);
    // Graceful shutdown waits up to 10 s for open connections; the feed ends at once.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    while let Ok(Some(_)) = feed.chunk().await {}
}

#[tokio::test]
async fn session_cookie_mutations_from_other_sites_are_refused() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let cookie = format!("ozone_token={}", staff.token);
    let names = std::sync::atomic::AtomicUsize::new(0);
    let create = |origin: Option<&str>, site: Option<&str>, bearer: bool| {
        let name = format!(
            "Shop {}",
            names.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut req = app
            .http
            .post(app.url("/api/outlets/"))
            .header("cookie", &cookie)
            .json(&json!({ "name": name }));
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        if let Some(site) = site {
            req = req.header("sec-fetch-site", site);
        }
        if bearer {
            req = req.bearer_auth(&staff.token);
        }
        req.send()
    };
    let refused = create(Some("https://evil.example"), None, false)
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "cross_origin_request");
    let refused = create(None, Some("cross-site"), false).await.unwrap();
    assert_eq!(refused.status(), 403);
    let refused = create(Some("null"), None, false).await.unwrap();
    assert_eq!(refused.status(), 403);

    // This site's own pages, a bearer token and non-browser clients pass.
    let own = app.base.clone();
    for (origin, site, bearer) in [
        (Some(own.as_str()), Some("same-origin"), false),
        (Some("https://evil.example"), None, true),
        (None, None, false),
    ] {
        let reply = create(origin, site, bearer).await.unwrap();
        assert_eq!(reply.status(), 201, "{origin:?} {site:?} bearer: {bearer}");
    }
    // Reads are not affected.
    let read = app
        .http
        .get(app.url("/api/outlets/"))
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);

    // So do origins listed in `cors_allowed_origins`.
    let listed =
        spawn_app_with(|s| s.cors_allowed_origins = vec!["https://ops.example".into()]).await;
    let staff = listed.staff().await;
    let reply = listed
        .http
        .post(listed.url("/api/outlets/"))
        .header("cookie", format!("ozone_token={}", staff.token))
        .header("origin", "https://ops.example")
        .json(&json!({"name": "Shop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
}
