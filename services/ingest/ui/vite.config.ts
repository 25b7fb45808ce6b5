import { defineConfig } from "vite";

// The page is served by sluice-ingest under /ui/. `npm run dev` serves it with live reload
// and sends the API calls to an ingest on this machine (SLUICE_INGEST, by default the one
// `make run` starts).
export default defineConfig({
  base: "/ui/",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    // Chart.js is most of the page; one bundle is fine for a page served from memory.
    chunkSizeWarningLimit: 400,
  },
  server: {
    proxy: {
      "/v1": process.env.SLUICE_INGEST ?? "http://127.0.0.1:8080",
    },
  },
});
