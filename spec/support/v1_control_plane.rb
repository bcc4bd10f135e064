# frozen_string_literal: true

require "json"
require "rbconfig"

# A flowctl.v1 control plane built with the OFFICIAL grpc gem that behaves like upstream's
# Go one (FLOWCTL_V1.md): service_id = component_id, else component.id; an unknown id
# fails with UNKNOWN "service <id> not found"; Unregister always succeeds; no
# persistence (a restart forgets everything). It runs in a subprocess (spec/gen/official_v1:
# the official gem's classes as OfficialFlowctl::V1), so that a spec can kill it and start
# it again on the same port; it reports every request as a JSON line on its stdout.
#
#   cp = V1ControlPlane.start                        # or (code: :not_found, prefix: "svc-")
#   cp.wait_for { |evs| evs.count { |e| e["rpc"] == "heartbeat" } >= 3 }
#   cp.restart
class V1ControlPlane < RecordingControlPlane
  SCRIPT = <<~'RUBY'
    $LOAD_PATH.unshift(File.join(ARGV[0], "official_v1"))
    require "grpc"
    require "json"
    require "official_flowctl/v1/control_plane_services_pb"
    $stdout.sync = true
    port = Integer(ARGV[1])
    code = ARGV[2] == "not_found" ? GRPC::NotFound : GRPC::Unknown
    prefix = ARGV[3].to_s
    V1 = OfficialFlowctl::V1

    class Upstream < V1::ControlPlaneService::Service
      def initialize(code, prefix)
        @code = code
        @prefix = prefix
        @components = {}
        @mu = Mutex.new
      end

      def emit(h)
        @mu.synchronize { $stdout.puts(JSON.generate(h.merge(at: Time.now.to_f))) }
      end

      def register_component(req, call)
        c = req.component
        id = [req.component_id, c&.id].find { |s| s && !s.empty? } || "#{c&.type}-#{Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)}"
        id = "#{@prefix}#{id}"
        @mu.synchronize { @components[id] = {status: :HEALTH_STATUS_HEALTHY, metrics: {}} }
        emit(rpc: "register", service_id: id, component_id: req.component_id,
             component: c && JSON.parse(V1::ComponentInfo.encode_json(c)), headers: call.metadata)
        V1::RegisterResponse.new(service_id: id, connection_info: {"control_plane_endpoint" => "127.0.0.1"})
      end

      def heartbeat(req, call)
        known = @mu.synchronize do
          comp = @components[req.service_id]
          comp[:metrics].merge!(req.metrics.to_h) if comp
          comp[:status] = req.status if comp && req.status != :HEALTH_STATUS_UNKNOWN
          !comp.nil?
        end
        emit(rpc: "heartbeat", service_id: req.service_id, status: req.status.to_s, metrics: req.metrics.to_h,
             ok: known, headers: call.metadata)
        raise @code.new("service #{req.service_id} not found") unless known

        Google::Protobuf::Empty.new
      end

      def unregister_component(req, _call)
        @mu.synchronize { @components.delete(req.service_id) }
        emit(rpc: "unregister", service_id: req.service_id)
        Google::Protobuf::Empty.new
      end
    end

    server = GRPC::RpcServer.new(pool_size: 8)
    port = server.add_http2_port("127.0.0.1:#{port}", :this_port_is_insecure)
    server.handle(Upstream.new(code, prefix))
    Thread.new { server.wait_till_running(10); puts JSON.generate(port: port) }
    server.run
  RUBY

  def initialize(code: :unknown, prefix: "", port: 0)
    super(port: port)
    @code = code
    @prefix = prefix
  end

  private

  def spawn_args
    [SCRIPT, @code.to_s, @prefix]
  end
end
