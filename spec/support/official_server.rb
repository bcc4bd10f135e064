# frozen_string_literal: true

require "json"
require "rbconfig"
require_relative "official"

# A server built with the OFFICIAL grpc gem from the same .proto files, on 127.0.0.1 with
# an ephemeral port: the interop peer of the specs and the benchmarks.
#
#   server = OfficialServer.new
#   port = server.start(handler_for_controlplane: my_handler, handler_for_processor: nil, tls: false)
#   ...
#   server.stop
#
# Handlers are plain objects with one snake_case method per RPC, as the grpc gem calls
# them: unary `register_processor(request, call) -> response`, bidi
# `process(requests_enum, call) -> Enumerable of replies`; requests and replies are the
# official classes (Obsrvr::Flow::Controlplane::..., Obsrvr::Flow::Processor::...).
# An RPC the handler does not implement answers UNIMPLEMENTED; nil means the service
# is not served at all.
#
# tls: false (plaintext), :tls (spec/fixtures/tls/server.pem), :mtls (the same and the
# client certificate is required, signed by fixtures/tls/ca.pem), or a Hash
# {cert_chain:, private_key:, root_certs:, client_auth: true/false}.
#
# subprocess: true runs the server in its own Ruby process (fair for benchmarks: the
# client process has the CPU to itself); handlers are then given as constant names
# (Strings) defined by this file or by files listed in requires:.
class OfficialServer
  TLS_DIR = File.expand_path("../fixtures/tls", __dir__)

  attr_reader :port

  def initialize(subprocess: false, pool_size: 30, requires: [])
    @subprocess = subprocess
    @pool_size = pool_size
    @requires = requires
  end

  def self.tls_file(name) = File.read(File.join(TLS_DIR, name))

  # Queue#pop with a timeout (Ruby 3.1 has no pop(timeout:)): the item, or nil.
  def self.pop(queue, timeout)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      return queue.pop(true)
    rescue ThreadError
      return nil if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.005
    end
  end

  def start(handler_for_controlplane: nil, handler_for_processor: nil, tls: false)
    raise "already started" if @port

    @port = if @subprocess
              start_subprocess(handler_for_controlplane, handler_for_processor, tls)
            else
              start_in_process(handler_for_controlplane, handler_for_processor, tls)
            end
  end

  def stop
    return unless @port

    if @pid
      stop_subprocess
    else
      # bounded: a handler that never returns must not hang the suite
      stopper = Thread.new { @server.stop }
      stopper.join(5) or stopper.kill
      @thread.join(5) or @thread.kill
    end
    @port = nil
  end

  def address = "127.0.0.1:#{port}"

  # ---- in-process ---------------------------------------------------------

  def start_in_process(cp, pr, tls)
    Official.load!
    @server = GRPC::RpcServer.new(pool_size: @pool_size, poll_period: 0.2)
    port = @server.add_http2_port("127.0.0.1:0", self.class.credentials(tls))
    @server.handle(self.class.service(Obsrvr::Flow::Controlplane::ControlPlane::Service, cp)) if cp
    @server.handle(self.class.service(Obsrvr::Flow::Processor::ProcessorService::Service, pr)) if pr
    @thread = Thread.new { @server.run }
    @thread.report_on_exception = false
    @server.wait_till_running(10) or raise "official grpc server did not start"
    port
  end

  def self.credentials(tls)
    return :this_port_is_insecure if tls.nil? || tls == false

    opts = case tls
           when :tls then {cert_chain: tls_file("server.pem"), private_key: tls_file("server.key")}
           when :mtls then {cert_chain: tls_file("server.pem"), private_key: tls_file("server.key"),
                            root_certs: tls_file("ca.pem"), client_auth: true}
           when Hash then tls
           else raise ArgumentError, "tls: false, :tls, :mtls or a Hash (given #{tls.inspect})"
           end
    GRPC::Core::ServerCredentials.new(opts[:root_certs], [{private_key: opts[:private_key], cert_chain: opts[:cert_chain]}],
                                      opts[:client_auth] ? true : false)
  end

  # A subclass of the generated service whose methods call the handler (an RPC the
  # handler lacks answers UNIMPLEMENTED, as an official server without it would).
  def self.service(base, handler)
    handler = Object.const_get(handler).new if handler.is_a?(String)
    klass = Class.new(base)
    base.rpc_descs.each_key do |name|
      meth = GRPC::GenericService.underscore(name.to_s).to_sym
      klass.define_method(meth) do |req, call|
        raise GRPC::Unimplemented, "#{meth} is not handled" unless handler.respond_to?(meth)

        handler.public_send(meth, req, call)
      end
    end
    klass.new
  end

  # ---- subprocess ---------------------------------------------------------

  def start_subprocess(cp, pr, tls)
    [cp, pr].each { |h| raise ArgumentError, "subprocess handlers are constant names (Strings)" unless h.nil? || h.is_a?(String) }
    spec = JSON.generate(cp: cp, pr: pr, tls: tls.is_a?(Symbol) ? tls.to_s : tls, pool: @pool_size, req: @requires)
    @io = IO.popen([RbConfig.ruby, __FILE__, spec], "r+")
    @pid = @io.pid
    line = @io.gets or raise "official grpc server subprocess died"
    Integer(line[/\APORT (\d+)/, 1] || raise("unexpected output from the server subprocess: #{line.inspect}"))
  end

  def stop_subprocess
    @io.close_write
    Process.kill(:TERM, @pid)
    Process.wait(@pid)
  rescue Errno::ESRCH, Errno::ECHILD
    nil
  ensure
    @io.close unless @io.closed?
    @pid = nil
  end

  def self.subprocess_main(spec)
    spec = JSON.parse(spec)
    spec["req"].each { |f| require f }
    tls = spec["tls"].is_a?(String) ? spec["tls"].to_sym : spec["tls"]
    tls = tls.transform_keys(&:to_sym) if tls.is_a?(Hash)
    server = new(pool_size: spec["pool"])
    port = server.start(handler_for_controlplane: spec["cp"], handler_for_processor: spec["pr"], tls: tls)
    r, w = IO.pipe
    trap(:TERM) { w.write_nonblock(".") rescue nil }
    $stdout.puts "PORT #{port}"
    $stdout.flush
    Thread.new { $stdin.read; w.write_nonblock(".") rescue nil } # the parent went away
    r.read(1)
    server.stop
  end
end

# Handlers that answer everything at once, for benchmarks and smoke tests.
class OfficialServer
  # A handler made of blocks, one per RPC (the others answer UNIMPLEMENTED):
  #
  #   OfficialServer::Handler.new(register_processor: ->(req, call) { Resp.new(success: true) })
  class Handler
    def initialize(**impls)
      impls.each { |name, impl| define_singleton_method(name) { |req, call| impl.call(req, call) } }
    end
  end

  # ControlPlane: every Register succeeds echoing the id; heartbeats succeed.
  class EchoControlPlane
    CP = "Obsrvr::Flow::Controlplane"

    %w[processor source consumer].each do |kind|
      define_method(:"register_#{kind}") do |req, _call|
        Object.const_get("#{CP}::Register#{kind.capitalize}Response")
              .new("#{kind}_id": req.public_send(:"#{kind}_id"), success: true, message: "registered")
      end
      define_method(:"#{kind}_heartbeat") do |_req, _call|
        Object.const_get("#{CP}::#{kind.capitalize}HeartbeatResponse").new(success: true, message: "ok")
      end
    end
  end

  # ProcessorService: Process echoes every message back; GetCapabilities describes itself.
  class EchoProcessor
    def process(requests, _call) = requests.lazy.map { |m| m }

    def get_capabilities(_req, _call)
      Obsrvr::Flow::Processor::CapabilitiesResponse.new(processor_id: "echo", name: "echo", version: "1",
                                                        input_event_types: ["any"], output_event_types: ["any"],
                                                        max_concurrent: 1)
    end
  end
end

OfficialServer.subprocess_main(ARGV[0]) if $PROGRAM_NAME == __FILE__
