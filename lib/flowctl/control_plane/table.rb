# frozen_string_literal: true

module Flowctl
  module ControlPlane
    class Registry
      # The text table flowctl-controlplane prints. Whatever a component sent (ids, names,
      # metadata with NUL, newlines, terminal escape sequences, bidi overrides) is shown escaped
      # (\n, \e, \x00, \u202E) and cut to a width, so it can neither break the table's lines nor
      # drive the terminal. Metrics print faithfully: NaN, Infinity, -Infinity, integers without
      # ".0", other numbers with up to 6 significant digits, strings (flowctl.v1) as sent.
      module Table
        HEADER = %w[KIND PROTOCOL ID ENDPOINT STATUS LAST_HEARTBEAT METRICS].freeze
        CELL_WIDTH = 48
        METRICS_WIDTH = 96
        # C0 and C1 controls, DEL, and the Unicode format characters that reorder or hide text
        UNSAFE = /[\x00-\x1f\x7f\u0080-\u009f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/.freeze
        NAMED = { "\n" => "\\n", "\r" => "\\r", "\t" => "\\t", "\e" => "\\e" }.freeze

        module_function

        # rows: Components; now: Float seconds (the registry's clock).
        def render(components, now)
          return "(no components registered)" if components.empty?

          rows = components.map { |c| row(c, now) }
          widths = HEADER.each_index.map { |i| ([HEADER] + rows).map { |r| r[i].length }.max }
          ([HEADER] + rows).map { |r| r.each_with_index.map { |cell, i| cell.ljust(widths[i]) }.join("  ").rstrip }
                           .join("\n")
        end

        def row(c, now)
          age = format("%.1fs ago", now - c.last_heartbeat.to_f)
          metrics = c.metrics.map { |k, v| "#{safe(k, CELL_WIDTH)}=#{v.is_a?(String) ? safe(v, CELL_WIDTH) : number(v)}" }
          [c.kind.to_s, c.protocol.to_s, safe(c.id), c.endpoint.empty? ? "-" : safe(c.endpoint),
           safe(c.stale? ? "#{c.status} (stale)" : c.status), age,
           metrics.empty? ? "-" : cut(metrics.join(" "), METRICS_WIDTH)]
        end

        # The text with every unsafe character escaped, cut to width characters ("..." marks a cut).
        def safe(text, width = CELL_WIDTH)
          s = text.to_s
          s = s.scrub("?") unless s.valid_encoding?
          s = s.gsub(UNSAFE) { |ch| NAMED[ch] || (ch.ord < 0x100 ? format("\\x%02x", ch.ord) : format("\\u%04X", ch.ord)) }
          s = "\"\"" if s.empty?
          cut(s, width)
        end

        def cut(s, width) = s.length > width ? "#{s[0, width - 3]}..." : s

        def number(v)
          return v.to_s unless v.is_a?(Float)
          return "NaN" if v.nan?
          return v.positive? ? "Infinity" : "-Infinity" if v.infinite?
          return v.to_i.to_s if v == v.round && v.abs < 1e15

          format("%.6g", v)
        end
      end
    end
  end
end
