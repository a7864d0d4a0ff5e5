// Renders /openapi.json with the vendored Swagger UI (api/assets/swagger-ui/).
// Everything it loads comes from this server: the validator badge (which
// would call validator.swagger.io) is off.
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  // Every operation can be sent at once with the key given under Authorize.
  tryItOutEnabled: true,
  displayRequestDuration: true,
  defaultModelsExpandDepth: 0,
  docExpansion: "list",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
