# frozen_string_literal: true

require "socket"
require "json"
require "io/wait"

module Flowctl
  module Component
    # A small HTTP/1.1 server for health probes and Prometheus scrapes, on a TCPServer in
    # Ruby threads:
    #
    #   GET /health   200 when HEALTHY or DEGRADED, else 503   JSON {status, ready, component, metrics}
    #   GET /ready    200 once registered (at once when standalone) and until stopping, else 503
    #   GET /live     200 while the process serves
    #   GET /metrics  the Prometheus text format
    #
    # The report comes from `source`: #health_report (a Hash with :status, :ready and the rest
    # of the JSON) and #prometheus_text. Every connection gets one response and is closed.
    # Bounded: request heads up to MAX_HEAD bytes (else 431), READ_TIMEOUT seconds to send one
    # (else 408), WRITE_TIMEOUT to take the answer, MAX_CONNECTIONS at once (others are
    # answered 503, as many more; others are closed). Nothing a client sends stops the server.
    class HealthServer
      MAX_HEAD = 8 * 1024
      READ_TIMEOUT = 5.0
      WRITE_TIMEOUT = 5.0
      MAX_CONNECTIONS = 16
      LINGER = 1.0
      LINGER_BYTES = 64 * 1024
      REQUEST_LINE = %r{\A([A-Z]{1,16}) (/[^ ]*) HTTP/1\.[01]\z}.freeze
      REASONS = { 200 => "OK", 400 => "Bad Request", 404 => "Not Found", 405 => "Method Not Allowed",
                  408 => "Request Timeout", 431 => "Request Header Fields Too Large", 500 => "Internal Server Error",
                  503 => "Service Unavailable" }.freeze

      attr_reader :port, :host

      def initialize(source, host: "127.0.0.1", port: 0)
        @source = source
        @host = host
        @requested_port = port
        @connections = 0
        @rejecting = 0
        @lock = Mutex.new
      end

      # call-seq: start -> Integer (the bound port)
      def start
        @tcp = TCPServer.new(@host, @requested_port)
        @port = @tcp.local_address.ip_port
        @wake_r, @wake_w = IO.pipe
        @thread = Thread.new { accept_loop }
        @thread.name = "flowctl-health-http"
        @thread.report_on_exception = false
        @port
      end

      # Stops accepting and closes the socket; requests being answered finish on their own.
      def stop
        return unless @thread

        @wake_w.write_nonblock(".", exception: false)
        @thread.join(2) || @thread.kill
        [@tcp, @wake_r, @wake_w].each { |io| io.close unless io.closed? }
        @thread = nil
      end

      private

      def accept_loop
        loop do
          ready, = IO.select([@tcp, @wake_r])
          break if ready.include?(@wake_r)

          sock = @tcp.accept_nonblock(exception: false)
          next if sock == :wait_readable

          dispatch(sock)
        rescue Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM
          sleep 0.05 # out of descriptors: let connections finish, then accept again
        rescue IOError, Errno::EBADF
          break # closed by #stop
        rescue StandardError => e
          warn "flowctl health server: #{e.class}: #{e.message}"
        end
      end

      # One thread per connection, at most MAX_CONNECTIONS answering and as many more
      # answering 503; past both the connection is closed at once.
      def dispatch(sock)
        kind = @lock.synchronize do
          if @connections < MAX_CONNECTIONS
            @connections += 1
            :serve
          elsif @rejecting < MAX_CONNECTIONS
            @rejecting += 1
            :reject
          end
        end
        return sock.close unless kind

        t = Thread.new do
          kind == :serve ? serve(sock) : reject(sock)
        ensure
          sock.close unless sock.closed?
          @lock.synchronize { kind == :serve ? @connections -= 1 : @rejecting -= 1 }
        end
        t.report_on_exception = false
      end

      def reject(sock)
        respond(sock, 503, json(error: "too many connections"), "application/json", head: false)
        linger(sock)
      end

      def serve(sock)
        code, head_only = handle(sock)
        respond(sock, *code, head: head_only) if code
        linger(sock)
      rescue StandardError => e
        respond(sock, 500, json(error: "#{e.class}: #{e.message}"), "application/json", head: false)
      end

      # Half-closes and reads what the client still sends (up to LINGER_BYTES, for LINGER
      # seconds), so that closing with unread input does not reset the connection before the
      # client has read the answer.
      def linger(sock)
        sock.shutdown(Socket::SHUT_WR)
        deadline = now + LINGER
        left = LINGER_BYTES
        while left.positive? && (wait = deadline - now).positive?
          chunk = sock.read_nonblock(4096, exception: false)
          break if chunk.nil?
          next left -= chunk.bytesize if chunk.is_a?(String)
          break unless sock.wait_readable(wait)
        end
      rescue SystemCallError, IOError
        nil
      end

      # [[code, body, content_type], head_only] or nil when the client left.
      def handle(sock)
        head = read_head(sock)
        return [[head, json(error: REASONS[head]), "application/json"], false] if head.is_a?(Integer)
        return nil if head.nil?

        line = head.split(/\r?\n/, 2).first.to_s
        m = REQUEST_LINE.match(line)
        return [[400, json(error: "malformed request line"), "application/json"], false] unless m

        method, target = m.captures
        unless %w[GET HEAD].include?(method)
          return [[405, json(error: "only GET and HEAD"), "application/json"], false]
        end

        [route(target.split("?", 2).first), method == "HEAD"]
      end

      def route(path)
        case path
        when "/health", "/healthz" then health(:status)
        when "/ready", "/readyz" then health(:ready)
        when "/live", "/livez" then health(:live)
        when "/metrics" then [200, @source.prometheus_text, Prometheus::CONTENT_TYPE]
        else [404, json(error: "not found", paths: %w[/health /ready /live /metrics]), "application/json"]
        end
      end

      def health(kind)
        report = @source.health_report
        ok = case kind
             when :status then %w[HEALTHY DEGRADED].include?(report[:status])
             when :ready then report[:ready]
             else true
             end
        [ok ? 200 : 503, json(report), "application/json"]
      end

      def json(obj) = JSON.generate(obj) << "\n"

      # The request head (String), an error code (408, 431), or nil when the client closed.
      def read_head(sock)
        buf = +""
        deadline = now + READ_TIMEOUT
        until buf.include?("\r\n\r\n") || buf.include?("\n\n")
          return 431 if buf.bytesize > MAX_HEAD

          left = deadline - now
          return 408 if left <= 0

          chunk = sock.read_nonblock(4096, exception: false)
          case chunk
          when :wait_readable then return 408 unless sock.wait_readable(left)
          when nil then return nil
          else buf << chunk
          end
        end
        buf.bytesize > MAX_HEAD + 4 ? 431 : buf
      rescue Errno::ECONNRESET, Errno::EPIPE, IOError
        nil
      end

      def respond(sock, code, body, type, head: false)
        body = body.b
        out = +"HTTP/1.1 #{code} #{REASONS.fetch(code)}\r\nContent-Type: #{type}\r\nContent-Length: #{body.bytesize}\r\n" \
               "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        out << body unless head
        write_all(sock, out.b)
      rescue Errno::ECONNRESET, Errno::EPIPE, IOError
        nil # the client left
      end

      def write_all(sock, data)
        deadline = now + WRITE_TIMEOUT
        until data.empty?
          n = sock.write_nonblock(data, exception: false)
          if n == :wait_writable
            left = deadline - now
            return if left <= 0 || !sock.wait_writable(left)
          else
            data = data.byteslice(n..)
          end
        end
      end

      def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
