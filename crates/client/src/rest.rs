//! The few REST calls tools need: create a signing key and a space.

use serde_json::Value;

#[derive(Debug, Clone)]
pub struct RestClient {
    base: String,
    token_id: String,
    token_secret: String,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{status}: {body}")]
    Api { status: u16, body: String },
}

/// A reqwest client that speaks https:// with [`crate::tls::client_config`].
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls((*crate::tls::client_config()).clone())
        .build()
        .unwrap_or_default()
}

impl RestClient {
    pub fn new(base: &str, token_id: &str, token_secret: &str) -> Self {
        RestClient {
            base: base.trim_end_matches('/').to_string(),
            token_id: token_id.into(),
            token_secret: token_secret.into(),
            http: http_client(),
        }
    }

    /// Sends `request` with Basic auth; returns the `data` of a success, the error body of
    /// a failure.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value, RestError> {
        let res = request
            .basic_auth(&self.token_id, Some(&self.token_secret))
            .send()
            .await?;
        let status = res.status().as_u16();
        let body: Value = res.json().await?;
        if status >= 300 {
            return Err(RestError::Api {
                status,
                body: body.to_string(),
            });
        }
        Ok(body["data"].clone())
    }

    async fn post(&self, path: &str) -> Result<Value, RestError> {
        let url = format!("{}{path}", self.base);
        self.call(
            self.http
                .post(url)
                .header("content-type", "application/json")
                .body("{}"),
        )
        .await
    }

    /// Returns `(key id, base64 PEM private key)`.
    pub async fn create_signing_key(&self) -> Result<(String, String), RestError> {
        let key = self.post("/system/v1/signing-keys").await?;
        Ok((
            key["id"].as_str().unwrap_or_default().to_string(),
            key["private_key"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Returns the new space's id.
    pub async fn create_space(&self) -> Result<String, RestError> {
        let space = self.post("/video/v1/spaces").await?;
        Ok(space["id"].as_str().unwrap_or_default().to_string())
    }

    pub async fn space(&self, id: &str) -> Result<Value, RestError> {
        let url = format!("{}/video/v1/spaces/{id}", self.base);
        self.call(self.http.get(url)).await
    }
}
