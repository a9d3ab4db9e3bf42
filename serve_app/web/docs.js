// imgserve API reference (/docs): starts Swagger UI (docs/assets/swagger-ui-bundle.js, served by the
// service from the swagger-ui-bundle-v2 package) on this service's openapi.json. A file, not an inline
// script, so the page runs under the service's self-only Content-Security-Policy.
//
// With API keys configured openapi.json needs a key: the key typed in the field above is kept where
// the web page keeps its own (localStorage, same origin: a key typed in either page is used by both)
// and sent as `Authorization: Bearer` with every request to this origin (the document and "Try it
// out"), never in a URL and never to another origin.
(() => {
  "use strict";

  const KEY_STORAGE = "imgserve.apiKey"; // the web page's (serve_app/web/app.js)
  const SPEC_URL = new URL("openapi.json", document.baseURI).href;
  const $ = (id) => document.getElementById(id);

  function storedKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ""; } catch (_) { return ""; }
  }

  function storeKey(key) {
    try {
      key ? localStorage.setItem(KEY_STORAGE, key) : localStorage.removeItem(KEY_STORAGE);
    } catch (_) { /* private mode */ }
  }

  function sameOrigin(url) {
    try { return new URL(url, document.baseURI).origin === location.origin; } catch (_) { return false; }
  }

  function say(text, problem) {
    $("key-state").textContent = text;
    $("key-state").classList.toggle("problem", Boolean(problem));
    if (problem) $("api-key").setAttribute("aria-invalid", "true");
    else $("api-key").removeAttribute("aria-invalid");
  }

  // The service's error message for a refused document (the one JSON error shape), else its status.
  function refusal(response) {
    let body = response.body;
    if (!body || typeof body !== "object") {
      try { body = JSON.parse(response.text || response.data || ""); } catch (_) { body = null; }
    }
    const message = body && body.error && body.error.message;
    if (response.status === 401) {
      return storedKey() ? "This API key is not accepted: check it and try again."
        : "This service needs an API key to show its reference: enter it above.";
    }
    return message ? `The API reference could not be loaded: ${message}`
      : `The API reference could not be loaded (status ${response.status}).`;
  }

  function start() {
    window.ui = SwaggerUIBundle({
      url: SPEC_URL,
      dom_id: "#swagger-ui",
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
      deepLinking: true,
      validatorUrl: null, // the badge would send the document's URL to validator.swagger.io
      requestInterceptor: (request) => {
        const key = storedKey();
        if (key && sameOrigin(request.url)) request.headers.Authorization = `Bearer ${key}`;
        return request;
      },
      responseInterceptor: (response) => {
        if (response.url === SPEC_URL) {
          if (response.ok) say(storedKey() ? "Key in use." : "", false);
          else say(refusal(response), true);
        }
        return response;
      },
    });
  }

  $("api-key").value = storedKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey($("api-key").value.trim());
    start();
  });
  start();
})();
